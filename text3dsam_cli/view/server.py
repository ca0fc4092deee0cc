"""Running the viewer app with uvicorn: loopback by default, a free-port check, Ctrl-C stops it cleanly."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import webbrowser
from collections.abc import Callable
from typing import TYPE_CHECKING

from text3dsam_cli.errors import UsageError
from text3dsam_cli.view.session import ViewSession

if TYPE_CHECKING:
    import uvicorn

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def require_web_stack() -> None:
    """Fail with a one-line hint when the ``view`` extra (Starlette, uvicorn) is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"view needs the 'view' extra ({exc.name} is missing): "
                         "pip install 'text3dsam-cli[view]'") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this computer only."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_port(host: str, port: int) -> None:
    """Refuse a port that is out of range or already taken, before the model work starts."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: give 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is in use: choose another with --port") from None
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def url_for(host: str, port: int, token: str | None = None) -> str:
    """The page's address (``[...]`` around IPv6 hosts; the wildcard hosts shown as 127.0.0.1), with
    ``?token=`` when given: the address that ``view`` prints and opens."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"
    return f"{base}?token={token}" if token else base


def allowed_hosts(host: str) -> list[str]:
    """Host header names the server answers to: loopback names and the bound address itself (``--host
    127.0.0.2``); any well-formed name for a wildcard or non-loopback address (the token still applies)."""
    from text3dsam_cli.view.app import LOOPBACK_NAMES

    return [*LOOPBACK_NAMES, host] if is_loopback(host) else ["*"]


def make_server(session: ViewSession, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                log_level: str = "warning") -> tuple[uvicorn.Server, str]:
    """The uvicorn server for ``session`` (not yet running) and the page's address, token included."""
    require_web_stack()
    import uvicorn

    from text3dsam_cli.view.app import create_app

    app = create_app(session, allowed_hosts=allowed_hosts(host), token=token)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                            server_header=False)
    return uvicorn.Server(config), url_for(host, port, app.state.token)


def serve(session: ViewSession, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True,
          on_ready: Callable[[str], None] | None = None, log_level: str = "warning",
          token: str | None = None) -> None:
    """Serve the viewer until Ctrl-C (or SIGTERM); open the page (token in its address) once it listens.
    ``token`` None: a new random one."""
    server, url = make_server(session, host, port, token, log_level)

    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            if on_ready is not None:
                on_ready(url)
            if open_browser:
                webbrowser.open(url)

    threading.Thread(target=announce, name="text3dsam-view-ready", daemon=True).start()
    # uvicorn re-raises Ctrl-C after its graceful shutdown: that is the normal way to stop.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise UsageError(f"the viewer could not listen on {host}:{port}")
