"""The viewer's ASGI app (Starlette): a fixed set of static files and a small JSON API over a ViewSession.

Only the files listed in :data:`STATIC_FILES` are ever served, looked up by exact name (no path is joined
from a request, so ``..`` and absolute paths cannot reach the file system). Every error is a JSON body
``{"error": "..."}`` with a 4xx status (5xx only for a bug), never a traceback page.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
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


class HostCheck:
    """ASGI middleware: answer 400 (JSON) to a Host header not in ``allowed`` ("*" allows all)."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            host = ""
            for key, value in scope.get("headers", []):
                if key == b"host":
                    host = value.decode("latin-1").lower()
                    break
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed:
                await _error(400, "invalid Host header").__call__(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _static_bytes(name: str) -> bytes:
    return resources.files("text3dsam_cli.view").joinpath("static", *name.split("/")).read_bytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def create_app(session: ViewSession, allowed_hosts: list[str] | None = None) -> Starlette:
    """The viewer app for ``session``. ``allowed_hosts`` (Host header names) defaults to loopback names only,
    which also keeps other web sites from reaching the API through DNS rebinding."""
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
        if "application/json" not in request.headers.get("content-type", ""):
            return _error(415, "send JSON: Content-Type: application/json")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(400, f"invalid JSON ({exc})")
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
    return Starlette(routes=routes, middleware=[Middleware(HostCheck, allowed=hosts)],
                     exception_handlers={HTTPException: http_error, Text3DSAMError: tool_error,
                                         Exception: server_error})


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
