"""Run an app under uvicorn on a socket bound before the model loads; SIGTERM is a graceful
stop (stop accepting, answer what is in flight, exit 0)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from typing import Optional

__all__ = ["bind", "run_server"]


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one); OSError when it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(server, sock: socket.socket, banner: str) -> bool:
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        host, port = sock.getsockname()[:2]
        print(f"doe serve: ready on http://{host}:{port} ({banner})", flush=True)
    await task
    return server.started


def run_server(app, *, sock: Optional[socket.socket] = None, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "warning", shutdown_timeout_s: float = 30.0, banner: str = "") -> int:
    """Serve ``app`` until SIGTERM or SIGINT; 0 after a graceful stop, 1 if it never started.

    Args:
        app: a Starlette/FastAPI app (``create_app``); ``app.state.draining`` turns True on the signal.
        sock: a bound socket (``bind``), else one is bound to ``host:port``.
        log_level: uvicorn's; "info" and "debug" also log every request.
        shutdown_timeout_s: how long to wait for in-flight requests after SIGTERM.
        banner: appended to the "ready on" line printed once the server accepts connections.
    """
    import uvicorn

    sock = sock or bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=shutdown_timeout_s, lifespan="on")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # /health answers 503 from now on
            super().handle_exit(sig, frame)

    server = Server(config)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn handles SIGTERM while it runs, then raises it again for the handler found before
    # it: this one, so that a graceful stop ends the process normally.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main else None
    try:
        started = asyncio.run(_serve(server, sock, banner))
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0 if started else 1
