"""The viewer's ASGI app (Starlette): a fixed set of static files and a small JSON API over a ViewSession.

Only the files listed in :data:`STATIC_FILES` are ever served, looked up by exact name (no path is joined
from a request, so ``..`` and absolute paths cannot reach the file system). Every error is a JSON body
``{"error": "..."}`` with a 4xx status (5xx only for a bug), never a traceback page.

Who may use the API (:class:`RequestGuard`, in front of every route): the Host header must parse strictly as
``host[:port]`` and name this server; every ``/api/`` request must carry the server's access token (as
``Authorization: Bearer T`` or the HttpOnly, SameSite=Strict cookie set when the page is opened with
``/?token=T``) and must not come from another origin (``Origin``, ``Sec-Fetch-Site``). The token keeps other
users of a shared computer out (they can reach 127.0.0.1:PORT, but do not know it); the origin checks and the
exact ``application/json`` body type keep web pages open in the user's browser out.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from text3dsam_cli.errors import Text3DSAMError
from text3dsam_cli.view.session import ViewSession

log = logging.getLogger(__name__)

#: URL path under /static/ -> (file in text3dsam_cli/view/static, media type). Nothing else is served.
STATIC_FILES = {
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
    "niivue/niivue.js": ("niivue/niivue.js", "text/javascript; charset=utf-8"),
    "niivue/LICENSE": ("niivue/LICENSE", "text/plain; charset=utf-8"),
    "niivue/THIRD-PARTY-LICENSES": ("niivue/THIRD-PARTY-LICENSES", "text/plain; charset=utf-8"),
    "niivue/VERSION": ("niivue/VERSION", "text/plain; charset=utf-8"),
}

#: The page may talk to this server only: no CDN, no external fetch, no inline script.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' "
                           "'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self' data: blob:; "
                           "worker-src 'self' blob:; font-src 'self' data:; object-src 'none'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
MAX_BODY_BYTES = 64 * 1024
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


#: ``host[:port]`` exactly: a name or IPv4 address, or an IPv6 address in brackets; nothing else (no ``@``).
_HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?))"
                          r"(?::(?P<port>[0-9]{1,5}))?$")
#: Characters a token may have (``secrets.token_urlsafe``'s, plus ``.`` and ``~``): safe in a URL and a cookie.
TOKEN_CHARACTERS = re.compile(r"^[A-Za-z0-9._~-]+$")


def new_token() -> str:
    """A fresh access token (``secrets.token_urlsafe``: 32 random bytes)."""
    return secrets.token_urlsafe(32)


def check_token(token: str) -> str:
    """``token`` if usable in the page's URL and cookie; else :class:`~text3dsam_cli.errors.UsageError`."""
    from text3dsam_cli.errors import UsageError

    if not TOKEN_CHARACTERS.match(token or ""):
        raise UsageError("--token: give one or more of the characters A-Z a-z 0-9 - _ . ~")
    return token


def host_name(header: str) -> str | None:
    """The host name of a ``Host`` header (lower case; IPv6 in brackets), or None when it is not ``host[:port]``."""
    match = _HOST_HEADER.match(header.strip().lower()) if header else None
    if match is None or (match.group("port") is not None and not 0 < int(match.group("port")) < 65536):
        return None
    return f"[{match.group('v6')}]" if match.group("v6") else match.group("name")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers (the first of each name; ASGI gives names in lower case)."""
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", []):
        found.setdefault(key, value)
    return found


def _cookie(header: bytes, name: str) -> bytes | None:
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key.decode("latin-1") == name:
            return value.strip()
    return None


class RequestGuard:
    """ASGI middleware: the Host check for every request; token and same-origin checks for ``/api/``.

    ``allowed`` are the host names this server answers to ("*" for any well-formed name: a server bound to
    a wildcard address). Refusals are JSON errors: 400 for a bad Host header, 403 for the rest.
    """

    def __init__(self, app: ASGIApp, allowed: list[str], token: str) -> None:
        self.app = app
        self.allowed = {h.lower() if not (":" in h and not h.startswith("[")) else f"[{h.lower()}]"
                        for h in allowed}
        self.token = token.encode("utf-8")

    def cookie_name(self, scope: Scope) -> str:
        """The token cookie's name: one per port, so that viewers on one host keep their own cookies."""
        server = scope.get("server") or (None, None)
        return f"text3dsam_view_{server[1] or 0}"

    def token_ok(self, given: bytes | None) -> bool:
        return given is not None and secrets.compare_digest(given, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host_header = headers.get(b"host", b"").decode("latin-1")
        name = host_name(host_header)
        if name is None or ("*" not in self.allowed and name not in self.allowed):
            await _error(400, "invalid Host header")(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/api/"):
            refusal = self.refuse_api(scope, headers, host_header)
            if refusal:
                await _error(403, refusal)(scope, receive, send)
                return
        elif path == "/" and scope.get("query_string"):
            query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
            if "token" in query:
                if not self.token_ok(query["token"].encode("utf-8")):
                    await _error(403, "wrong token: open the address that text3dsam view printed")(
                        scope, receive, send)
                    return
                # Keep the token out of the address bar and history: the cookie carries it from now on.
                response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
                response.set_cookie(self.cookie_name(scope), self.token.decode("utf-8"), httponly=True,
                                    samesite="strict", path="/")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refuse_api(self, scope: Scope, headers: dict[bytes, bytes], host_header: str) -> str | None:
        """Why an ``/api/`` request is refused, or None when it may go on."""
        fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
        if fetch_site in ("cross-site", "same-site"):
            return f"cross-origin request refused (Sec-Fetch-Site: {fetch_site})"
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").strip().lower() != f"http://{host_header.strip().lower()}":
            return "cross-origin request refused (Origin is not this server)"
        given = None
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        elif b"cookie" in headers:
            given = _cookie(headers[b"cookie"], self.cookie_name(scope))
        if not self.token_ok(given):
            return ("missing or wrong access token: open the address that text3dsam view printed "
                    "(http://HOST:PORT/?token=...) or send Authorization: Bearer TOKEN")
        return None


def _static_bytes(name: str) -> bytes:
    return resources.files("text3dsam_cli.view").joinpath("static", *name.split("/")).read_bytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def create_app(session: ViewSession, allowed_hosts: list[str] | None = None, token: str | None = None) -> Starlette:
    """The viewer app for ``session``, answering ``/api/`` requests that carry ``token`` (a new random one when
    None; the app keeps it as ``app.state.token``). ``allowed_hosts`` (Host header names) defaults to loopback
    names only, which also keeps other web sites from reaching the API through DNS rebinding."""
    cache: dict[str, bytes] = {}

    def static(name: str) -> Response:
        entry = STATIC_FILES.get(name)
        if entry is None:
            return _error(404, "not found")
        if name not in cache:
            cache[name] = _static_bytes(entry[0])
        return Response(cache[name], media_type=entry[1], headers=SECURITY_HEADERS)

    async def index(request: Request) -> Response:
        if "index.html" not in cache:
            cache["index.html"] = _static_bytes("index.html")
        return Response(cache["index.html"], media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def static_file(request: Request) -> Response:
        return static(request.path_params["name"])

    async def info(request: Request) -> Response:
        return JSONResponse(session.info(), headers=SECURITY_HEADERS)

    async def segment(request: Request) -> Response:
        if not is_json_type(request.headers.get("content-type", "")):
            return _error(415, "send JSON: Content-Type: application/json")
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        data = parse_json(body)
        if isinstance(data, Response):
            return data
        if not isinstance(data, dict) or "prompts" not in data:
            return _error(400, 'expected {"prompts": ["liver", ...]}')
        unknown = sorted(set(data) - {"prompts"})
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(unknown)}")
        from starlette.concurrency import run_in_threadpool

        answer = await run_in_threadpool(session.segment, data["prompts"])
        return JSONResponse(answer, headers=SECURITY_HEADERS)

    async def labels(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(session.labels_nifti)
        return Response(data, media_type="application/gzip", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{_stem(session)}_seg.nii.gz"'})

    async def image(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(session.image_nifti)
        return Response(data, media_type="application/gzip", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{_stem(session)}.nii.gz"'})

    async def sidecar(request: Request) -> Response:
        return JSONResponse(session.sidecar(), headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{_stem(session)}_seg.json"'})

    async def vocabulary(request: Request) -> Response:
        query = request.query_params.get("q", "")
        modality = request.query_params.get("modality") or None
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _error(400, "limit must be a whole number")
        if not 0 < limit <= 200 or len(query) > 200:
            return _error(400, "limit must be 1..200 and q at most 200 characters")
        return JSONResponse({"suggestions": suggestions(query, modality, limit)}, headers=SECURITY_HEADERS)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def tool_error(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/static/{name:path}", static_file, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/segment", segment, methods=["POST"]),
        Route("/api/labels.nii.gz", labels, methods=["GET"]),
        Route("/api/image.nii.gz", image, methods=["GET"]),
        Route("/api/sidecar.json", sidecar, methods=["GET"]),
        Route("/api/vocabulary", vocabulary, methods=["GET"]),
    ]
    hosts = allowed_hosts if allowed_hosts is not None else LOOPBACK_NAMES
    token = check_token(token) if token is not None else new_token()
    app = Starlette(routes=routes, middleware=[Middleware(RequestGuard, allowed=hosts, token=token)],
                    exception_handlers={HTTPException: http_error, Text3DSAMError: tool_error,
                                        Exception: server_error})
    app.state.token = token
    return app


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type is exactly ``application/json`` (a ``charset=utf-8`` parameter allowed): a type
    that a web page cannot send to another site without the browser asking this server first (CORS)."""
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    return media == "application/json" and all(p.replace(" ", "") == "charset=utf-8" for p in params)


async def read_body(request: Request) -> bytes | Response:
    """The request body, at most :data:`MAX_BODY_BYTES`: a larger ``Content-Length`` is refused before reading,
    and reading stops as soon as more arrives (chunked bodies too); 413 either way."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit() or not declared.isascii():
            return _error(400, "invalid Content-Length")
        if int(declared) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, or a 400 response: invalid JSON, nesting too deep for the parser, or text
    that is not valid Unicode (an unpaired surrogate such as ``"\\ud800"``)."""
    try:
        data = json.loads(body)
    except RecursionError:
        return _error(400, "invalid JSON (nested too deeply)")
    except ValueError as exc:
        return _error(400, f"invalid JSON ({exc})")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return _error(400, "invalid text in the JSON body (an unpaired surrogate)")
    except RecursionError:
        return _error(400, "invalid JSON (nested too deeply)")
    return data


def _stem(session: ViewSession) -> str:
    stem = session.item.stem or "scan"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def suggestions(query: str, modality: str | None, limit: int) -> list[dict[str, Any]]:
    """Prompt suggestions from the training vocabulary (``text3dsam_cli.prompts``) matching ``query``."""
    from text3dsam_cli.prompts import search_vocabulary

    out = []
    for entry in search_vocabulary(query, modality=modality, limit=limit):
        out.append({"name": entry.name, "modality": entry.modality, "datasets": list(entry.datasets)})
    return out
