"""What the unplug-and-play runtime takes (``Request``) and answers (``Result``)."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

__all__ = ["Counts", "Recent", "Request", "Result", "text_tokens"]


@dataclass
class Request:
    """One text (and optional pair) to classify, or a prompt to continue for a generation task
    (at most ``max_new_tokens``, default 32); ``task`` None lets a router pick it."""

    text: str
    text_pair: Optional[str] = None
    task: Optional[str] = None
    id: Any = None
    max_new_tokens: Optional[int] = None

    @classmethod
    def coerce(cls, item: Union["Request", dict, str], position: int) -> "Request":
        """A Request from a Request, a dict of its fields or a plain text; ``id`` defaults to ``position``."""
        if isinstance(item, Request):
            req = item
        elif isinstance(item, str):
            req = cls(text=item)
        elif isinstance(item, dict):
            unknown = set(item) - {"text", "text_pair", "task", "id", "max_new_tokens"}
            if unknown:
                raise ValueError(f"request {position}: unknown fields {sorted(unknown)}; expected text, "
                                 "text_pair, task, id, max_new_tokens")
            if "text" not in item:
                raise ValueError(f"request {position}: missing 'text' (got fields {sorted(item)})")
            req = cls(**item)
        else:
            raise TypeError(f"request {position}: expected a Request, dict or str, got {type(item).__name__}")
        if not isinstance(req.text, str):
            raise TypeError(f"request {position}: 'text' must be a string, got {type(req.text).__name__}")
        limit = req.max_new_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"request {position}: 'max_new_tokens' must be a positive integer, got {limit!r}")
        if req.id is None:
            req.id = position
        return req


@dataclass
class Result:
    """What the runtime answers for one Request (``error`` set when it could not be served)."""

    id: Any
    task: Optional[str]  # the task that served the request
    expert: str  # the expert's task, or "dense"
    label: Optional[str] = None
    label_id: Optional[int] = None
    probability: Optional[float] = None
    routed: bool = False  # the task was identified from the text
    route_confidence: Optional[float] = None
    latency_ms: float = 0.0  # switch + inference of this request's batch
    switch_ms: float = 0.0
    batch_size: int = 0
    error: Optional[str] = None
    text: Optional[str] = None  # generation tasks: the generated text
    finish_reason: Optional[str] = None  # generation tasks: "stop", "length" or "cancelled"

    def to_dict(self) -> dict:
        return asdict(self)


def text_tokens(tokenizer, text: str, text_pair: Optional[str] = None, max_length: Optional[int] = None) -> int:
    """The tokens ``tokenizer`` makes of ``text`` (and ``text_pair``), special tokens included,
    at most ``max_length`` (None: all of them)."""
    pair = (text_pair,) if text_pair is not None else ()
    cut = {} if max_length is None else {"truncation": True, "max_length": max_length}
    return len(tokenizer(text, *pair, **cut)["input_ids"])


class Recent(deque):
    """A bounded log that also slices (``records[-5:]``), as the list it replaced did."""

    def __getitem__(self, i):
        return list(self)[i] if isinstance(i, slice) else super().__getitem__(i)


class Counts:
    """Running totals of a runtime's log (the log itself keeps only the recent entries)."""

    def __init__(self):
        self.requests = self.errors = self.routed = self.switches = 0

    def add(self, results: Sequence[Result]) -> None:
        self.requests += len(results)
        self.errors += sum(r.error is not None for r in results)
        self.routed += sum(bool(r.routed) for r in results)
