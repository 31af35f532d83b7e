"""The HTTP API's request and response bodies, and the error every endpoint answers with."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

__all__ = ["ClassifyItem", "ClassifyResult", "GenerateRequest", "GenerateResult", "ErrorBody", "ApiError",
           "ERROR_RESPONSES", "MIN_TEMPERATURE", "describe"]

#: the smallest sampling temperature above 0: logits / temperature stays finite in float32
MIN_TEMPERATURE = 1e-4

_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def describe(value: Any, width: int = 40) -> str:
    """A JSON value as an error message names what arrived: ``a string "5"``, ``a boolean true``."""
    name = next((n for t, n in _JSON_TYPES if isinstance(value, t)), type(value).__name__)
    if value is None:
        return "null"
    shown = json.dumps(value, default=repr)  # ASCII, with any lone surrogate escaped
    shown = shown if len(shown) <= width else shown[:width] + "..."
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} {shown}"


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"expected Unicode text, got a lone surrogate {value[exc.start]!r} at character {exc.start} "
                         "(it has no UTF-8 encoding)") from None
    return value


def _id(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a string or an integer, got {describe(value)}")
    return _unicode(value) if isinstance(value, str) else value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty text, got only whitespace" if value else "expected a non-empty text")
    return value


#: a string of Unicode text (a lone surrogate, as JSON's "\ud800" can write, is refused)
Text = Annotated[str, AfterValidator(_unicode)]
#: a request's id: a string or an integer, never a boolean
Id = Annotated[Union[int, str], BeforeValidator(_id)]


class ClassifyItem(BaseModel):
    """One text to classify. Without ``task`` the router picks one."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: Text = Field(description="the text to classify")
    text_pair: Optional[Text] = Field(None, description="second text, for pair tasks")
    task: Optional[Text] = Field(None, description="a task this server serves (GET /v1/experts); omit to route")
    id: Optional[Id] = Field(None, description="echoed back in the result (a string or an integer)")

    _text = field_validator("text")(_not_blank)


class ClassifyResult(BaseModel):
    id: Optional[Union[int, str]] = None
    task: str = Field(description="the task that served the item")
    label: str
    label_id: int
    probability: float = Field(description="softmax probability of the label")
    routed: bool = Field(description="the task was identified from the text by the router")
    route_confidence: Optional[float] = Field(None, description="the router's confidence, when routed")
    expert: str = Field(description="the expert that served it (its task), or 'dense' below the threshold")
    latency_ms: float = Field(description="receipt to answer, on the server")
    queue_ms: float = Field(description="time waiting for the worker")
    forward_ms: float = Field(description="switch + forward of the item's batch")
    switch_ms: float
    batch_size: int


class GenerateRequest(BaseModel):
    """Continue ``prompt``; with ``task`` on that task's expert with its soft prompt, else dense."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Text
    task: Optional[Text] = None
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description=f"0: greedy, else at least {MIN_TEMPERATURE}")
    top_k: int = Field(0, ge=0, description="0: off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: bool = Field(False, description="answer as server-sent events, one per token")

    _prompt = field_validator("prompt")(_not_blank)

    @field_validator("temperature")
    @classmethod
    def _divisible(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"expected 0 (greedy) or a temperature from {MIN_TEMPERATURE} to 100, got {value!r} "
                             "(the logits divided by it overflow)")
        return value


class GenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    task: Optional[str]
    expert: str
    prompt_tokens: int
    finish_reason: str = Field(description="stop (end-of-sequence token) or length")
    latency_ms: float
    queue_ms: float


class ErrorBody(BaseModel):
    kind: str = Field(description="malformed_json, invalid_request, unknown_task, too_large, queue_full, "
                      "shutting_down, inference_error, request_timeout, not_found, ...")
    detail: Any
    tasks: Optional[list[str]] = Field(None, description="the tasks served (unknown_task)")


class ApiError(Exception):
    def __init__(self, status: int, kind: str, detail: Any, headers: Optional[dict] = None, **extra):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers, self.extra = status, kind, detail, headers, extra


#: the documented error answers of the endpoints (OpenAPI)
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 404, 408, 413, 415, 422, 500, 503)}
