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

__all__ = ["add_error_handlers", "openai_error", "OPENAI_PATHS"]

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_OPENAI_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(server: ServerState, exc: ApiError) -> JSONResponse:
    """``exc`` in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` (a schema
    error is a 400, as OpenAI answers one)."""
    server.metrics.errors.labels(kind=exc.kind).inc()
    detail, param = exc.detail, exc.extra.get("param")
    if isinstance(detail, list):  # schema errors: [{loc, msg, type}]
        first = detail[0] if detail else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        param = param or (".".join(loc) or None)
        if first.get("type") == "extra_forbidden":
            detail = f"Unrecognized request argument supplied: {param}"
        else:
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in detail)
    status = 400 if exc.status == 422 else exc.status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": str(detail), "type": kind, "param": param, "code": exc.kind}}
    return JSONResponse(body, status_code=status, headers=exc.headers)


def _is_openai(request: Request) -> bool:
    return request.url.path.rstrip("/") in OPENAI_PATHS


def add_error_handlers(app: FastAPI, server: ServerState, too_large: Callable[[int], JSONResponse]) -> None:
    """API errors, schema errors (400 malformed JSON, 415 not JSON, 422 not the schema) and
    Starlette's own (404, 405, a body over the limit or not complete in time, a client gone while
    sending)."""
    metrics = server.metrics

    def render(request: Request, exc: ApiError) -> JSONResponse:
        return openai_error(server, exc) if _is_openai(request) else server.error(exc)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (media == "application/json" or media.startswith("application/") and media.endswith("+json")):
            return render(request, ApiError(415, "unsupported_media_type", "expected Content-Type: application/json, "
                                         f"got {media or 'none'}"))
        if any(e.get("type") == "json_invalid" for e in errors):
            return render(request, ApiError(400, "malformed_json", f"the body is not valid JSON: "
                                         f"{errors[0].get('ctx', {}).get('error', errors[0].get('msg'))}"))
        return render(request, ApiError(422, "invalid_request", readable(errors, exc.body)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ClientDisconnect):  # gone while sending the body
            metrics.errors.labels(kind="disconnected").inc()
            return Response(status_code=DISCONNECTED)
        cause = exc.__cause__
        if isinstance(cause, BodyTooLarge):
            return too_large(cause.args[0])
        if isinstance(cause, BodyTimeout):
            return render(request, ApiError(408, "request_timeout", str(cause), headers={"Connection": "close"}))
        if isinstance(cause, UnicodeDecodeError):
            return render(request, ApiError(400, "malformed_json", f"the body is not valid JSON: expected UTF-8 text, "
                                         f"got the byte 0x{cause.object[cause.start]:02x} at position {cause.start}"))
        if isinstance(cause, RecursionError):
            return render(request, ApiError(400, "malformed_json", "the body is not valid JSON for this server: expected "
                                         f"arrays and objects nested at most about {sys.getrecursionlimit()} levels "
                                         "deep (its parser's limit), got deeper nesting"))
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return render(request, ApiError(exc.status_code, kind, exc.detail, headers=getattr(exc, "headers", None)))


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
