"""Request bodies of the OpenAI-compatible endpoints. Fields OpenAI defines but this server does
not implement are accepted only at their neutral value (``unsupported`` names the others, for a
400); unknown fields are refused."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from doe.serve.schemas import MIN_TEMPERATURE, Text

__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "unsupported", "MAX_STOPS"]

MAX_STOPS = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text = Field(description="an expert's name (GET /v1/models), or the base model's id for the dense model")
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="default 1; 0: greedy")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="choices per prompt")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[Text, list[Text]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="choice i samples with seed + i")
    user: Optional[Text] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text]]
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[Text] = None
    logprobs: Optional[int] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]
    name: Optional[Text] = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None


# field -> the values that mean "not used" (anything else is refused with a 400)
_NEUTRAL = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None,), "logprobs": (None, False),
    "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
    "functions": (None, []), "function_call": (None, "none"),
}


def unsupported(body: _Sampling) -> Optional[str]:
    """The first field set to something this server does not implement, else None."""
    for name, neutral in _NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in neutral:
            return name
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt != {"type": "text"}:
        return "response_format"
    if body.temperature is not None and 0 < body.temperature < MIN_TEMPERATURE:
        return "temperature"
    return None
