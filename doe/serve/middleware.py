"""ASGI middleware of the app: the body size limit and the request metrics."""

from __future__ import annotations

from doe.serve.metrics import Metrics

__all__ = ["BodyTooLarge", "LimitBody", "CountRequests", "ENDPOINTS"]

ENDPOINTS = ("/v1/classify", "/v1/generate", "/v1/experts", "/health", "/metrics")


class BodyTooLarge(Exception):
    """A request body over ``max_body_bytes`` (answered 413)."""


class LimitBody:
    """ASGI middleware: a body over ``limit`` bytes is refused, by its Content-Length before it
    is read, else (chunked) once the bytes read pass the limit."""

    def __init__(self, app, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(int(length))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
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
