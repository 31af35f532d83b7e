"""How the app answers what goes wrong: every error is JSON ``{"kind": ..., "detail": ...}``."""

from __future__ import annotations

import sys
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from doe.serve.middleware import BodyTimeout, BodyTooLarge
from doe.serve.schemas import ApiError, describe
from doe.serve.state import DISCONNECTED, ServerState

__all__ = ["add_error_handlers"]


def add_error_handlers(app: FastAPI, server: ServerState, too_large: Callable[[int], JSONResponse]) -> None:
    """API errors, schema errors (400 malformed JSON, 415 not JSON, 422 not the schema) and
    Starlette's own (404, 405, a body over the limit or not complete in time, a client gone while
    sending)."""
    metrics = server.metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return server.error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (media == "application/json" or media.startswith("application/") and media.endswith("+json")):
            return server.error(ApiError(415, "unsupported_media_type", "expected Content-Type: application/json, "
                                         f"got {media or 'none'}"))
        if any(e.get("type") == "json_invalid" for e in errors):
            return server.error(ApiError(400, "malformed_json", f"the body is not valid JSON: "
                                         f"{errors[0].get('ctx', {}).get('error', errors[0].get('msg'))}"))
        return server.error(ApiError(422, "invalid_request", readable(errors, exc.body)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ClientDisconnect):  # gone while sending the body
            metrics.errors.labels(kind="disconnected").inc()
            return Response(status_code=DISCONNECTED)
        cause = exc.__cause__
        if isinstance(cause, BodyTooLarge):
            return too_large(cause.args[0])
        if isinstance(cause, BodyTimeout):
            return server.error(ApiError(408, "request_timeout", str(cause), headers={"Connection": "close"}))
        if isinstance(cause, UnicodeDecodeError):
            return server.error(ApiError(400, "malformed_json", f"the body is not valid JSON: expected UTF-8 text, "
                                         f"got the byte 0x{cause.object[cause.start]:02x} at position {cause.start}"))
        if isinstance(cause, RecursionError):
            return server.error(ApiError(400, "malformed_json", "the body is not valid JSON for this server: expected "
                                         f"arrays and objects nested at most about {sys.getrecursionlimit()} levels "
                                         "deep (its parser's limit), got deeper nesting"))
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return server.error(ApiError(exc.status_code, kind, exc.detail, headers=getattr(exc, "headers", None)))


def readable(errors: list[dict], body: Any) -> list[dict]:
    """Validation errors as {loc, msg, type}, the msg naming what arrived; for the one-or-many
    classify body, only those of the branch the body's JSON type selects."""
    branches = {"ClassifyItem": dict, "list[ClassifyItem]": list}
    if any(len(e["loc"]) > 1 and e["loc"][1] in branches for e in errors):
        if not isinstance(body, (dict, list)):
            return [{"loc": ["body"], "msg": f"expected a JSON object or a list of objects, got "
                     f"{type(body).__name__}", "type": "body_type"}]
        errors = [dict(e, loc=(e["loc"][0], *e["loc"][2:])) for e in errors
                  if len(e["loc"]) < 2 or e["loc"][1] not in branches or isinstance(body, branches[e["loc"][1]])]
    return [{"loc": [_printable(p) for p in e.get("loc", ())], "msg": _with_input(e), "type": e.get("type", "")}
            for e in errors]


def _printable(part: Any) -> Any:
    """A location part that can be encoded (a lone surrogate in a key becomes its escape)."""
    return part.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(part, str) else part


def _with_input(error: dict) -> str:
    """Pydantic's message, with what arrived where the message does not say it."""
    msg = error.get("msg", "")
    if error.get("type") in ("missing", "extra_forbidden", "value_error") or "input" not in error:
        return msg
    return f"{msg}, got {describe(error['input'])}"
