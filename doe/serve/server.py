"""Run an app under uvicorn on a socket bound before the model loads; SIGTERM is a graceful
stop (stop accepting, answer what is in flight, exit 0). Connections that stall are closed."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
from typing import Callable, Optional

from doe.serve.config import ServeConfig

__all__ = ["bind", "run_server", "uvicorn_config", "head_timeout"]


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


def head_timeout(base: type, timeout: float, on_timeout: Callable[[], None] = lambda: None) -> type:
    """``base`` (a uvicorn HTTP protocol) closing a connection that has not sent a complete request
    head ``timeout`` seconds after it opened or after its previous answer: with a 408 when part
    of a head came, without an answer when nothing did. ``on_timeout`` is called on each 408."""

    class HeadTimeout(base):
        _timer: Optional[asyncio.TimerHandle] = None
        _head_bytes = 0

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._timer is not None:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._timer is not None and (not self._idle() or self.transport.get_protocol() is not self):
                self._disarm()  # a head came: its request runs (or the connection was upgraded)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._idle() and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_bytes = 0
            self._timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._head_bytes:
                on_timeout()
                body = json.dumps({"kind": "request_timeout", "detail": f"expected a complete request head within "
                                   f"{timeout:g} s (--header-timeout), got {self._head_bytes} bytes without its "
                                   "end"}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    HeadTimeout.__name__ = HeadTimeout.__qualname__ = f"HeadTimeout{base.__name__}"
    return HeadTimeout


def uvicorn_config(app, *, config: Optional[ServeConfig] = None, log_level: str = "warning",
                   shutdown_timeout_s: float = 30.0):
    """uvicorn's settings for ``app``: its HTTP protocol with the head timeout, the keep-alive
    timeout, graceful shutdown. ``config``: where the timeouts come from (default: the one the
    app was made with, ``app.state.doe.config``, else ServeConfig's defaults)."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    state = getattr(getattr(app, "state", None), "doe", None)
    config = config or getattr(state, "config", None) or ServeConfig()
    timed_out = (lambda: state.metrics.errors.labels(kind="request_timeout").inc()) if state else (lambda: None)
    return uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                          timeout_graceful_shutdown=shutdown_timeout_s, lifespan="on",
                          http=head_timeout(AutoHTTPProtocol, config.header_timeout_s, timed_out),
                          timeout_keep_alive=config.keep_alive_timeout_s)


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
               log_level: str = "warning", shutdown_timeout_s: float = 30.0, banner: str = "",
               config: Optional[ServeConfig] = None) -> int:
    """Serve ``app`` until SIGTERM or SIGINT; 0 after a graceful stop, 1 if it never started.

    Args:
        app: a Starlette/FastAPI app (``create_app``); ``app.state.draining`` turns True on the signal.
        sock: a bound socket (``bind``), else one is bound to ``host:port``.
        log_level: uvicorn's; "info" and "debug" also log every request.
        shutdown_timeout_s: how long to wait for in-flight requests after SIGTERM.
        banner: appended to the "ready on" line printed once the server accepts connections.
        config: the connection timeouts (default: those of the config ``create_app`` was given).
    """
    import uvicorn

    sock = sock or bind(host, port)
    settings = uvicorn_config(app, config=config, log_level=log_level, shutdown_timeout_s=shutdown_timeout_s)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # /health answers 503 from now on
            super().handle_exit(sig, frame)

    server = Server(settings)
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
