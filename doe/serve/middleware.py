"""ASGI middleware of the app: the body size and time limits, and the request metrics."""

from __future__ import annotations

import asyncio
from typing import Optional

from doe.serve.metrics import Metrics

__all__ = ["BodyTimeout", "BodyTooLarge", "LimitBody", "CountRequests", "ENDPOINTS"]

ENDPOINTS = ("/v1/classify", "/v1/generate", "/v1/experts", "/health", "/metrics")


class BodyTooLarge(Exception):
    """A request body over ``max_body_bytes`` (answered 413)."""


class BodyTimeout(Exception):
    """A request body not complete ``timeout`` seconds after its head (answered 408)."""

    def __init__(self, timeout: float, seen: int, length: Optional[int]):
        of = f"of {length} " if length is not None else "(chunked) "
        super().__init__(f"expected the whole request body within {timeout:g} s of its head (--body-timeout), "
                         f"got {seen} bytes {of}by then")


class LimitBody:
    """ASGI middleware: a body over ``limit`` bytes is refused, by its Content-Length before it
    is read, else (chunked) once the bytes read pass the limit; reading a body that is not
    complete ``timeout`` seconds after the request head raises BodyTimeout."""

    def __init__(self, app, limit: int, refuse, timeout: Optional[float] = None):
        self.app, self.limit, self.refuse, self.timeout = app, limit, refuse, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(int(length))(scope, receive, send)
        seen, complete = 0, False
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout

        async def counted():
            nonlocal seen, complete
            if complete or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                except asyncio.TimeoutError:
                    raise BodyTimeout(self.timeout, seen, int(length) if length.isdigit() else None) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(seen)
            return message

        await self.app(scope, counted, send)


class CountRequests:
    """ASGI middleware: requests by endpoint and status, and how many are in flight."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
