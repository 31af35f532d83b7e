"""Settings of ``doe serve``: batching, limits, back-pressure and shutdown, validated on construction."""

from __future__ import annotations

import math
import warnings
from dataclasses import InitVar, asdict, dataclass
from typing import Optional, Sequence

__all__ = ["ServeConfig", "check_positions"]


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, what it accepts and how long it waits.

    max_batch: items per forward. max_wait_ms: how long the oldest queued item waits for a
    batch to fill. token_budget: padded text tokens per batch (batch size x its longest text).
    max_length: tokens per text (more: 413); also the runtime's truncation length, so nothing
    accepted is truncated (``max_tokens``: its earlier name, accepted with a DeprecationWarning).
    max_queue: queued items before new requests get 503. max_items:
    items in one request body (more: 413). max_new_tokens: the largest ``max_new_tokens`` a
    generate request may ask for. max_body_bytes: request body size (more: 413, unread).
    retry_after_s: the Retry-After of a 503. shutdown_timeout_s: how long a graceful shutdown
    waits for in-flight requests. header_timeout_s: how long a connection may take to send a
    request's head, from its opening or the previous answer (then 408 if part of one came, and
    the connection is closed). body_timeout_s: how long after its head a body may take to arrive
    (then 408, and the connection is closed). keep_alive_timeout_s: how long an idle connection
    is kept open between requests. kv_budget: the most cache positions the decode batch of a
    decoder may hold (rows x its longest row's prompt and new tokens; None: no limit beyond
    max_batch rows): a generation that does not fit waits its turn.
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    token_budget: int = 2048
    max_length: int = 128
    max_queue: int = 256
    max_items: int = 64
    max_new_tokens: int = 256
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    header_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    kv_budget: Optional[int] = None
    max_tokens: InitVar[Optional[int]] = None

    def __post_init__(self, max_tokens: Optional[int] = None) -> None:
        if max_tokens is not None:
            if self.max_length != type(self).max_length:
                raise ValueError(f"max_tokens is the earlier name of max_length: give one, got max_length="
                                 f"{self.max_length} and max_tokens={max_tokens}")
            warnings.warn("ServeConfig(max_tokens=...) is now max_length (--max-length); the old name goes in the "
                          "next release", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "max_length", max_tokens)
        for name in ("max_batch", "token_budget", "max_length", "max_queue", "max_items", "max_new_tokens",
                     "max_body_bytes", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({_flag(name)}): expected an integer >= 1, got {value!r}")
        for name, positive in (("max_wait_ms", False), ("shutdown_timeout_s", False), ("header_timeout_s", True),
                               ("body_timeout_s", True), ("keep_alive_timeout_s", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{name} ({_flag(name)}): expected a number {'>' if positive else '>='} 0, "
                                 f"got {value!r}")
        if self.kv_budget is not None and (isinstance(self.kv_budget, bool) or not isinstance(self.kv_budget, int)
                                           or self.kv_budget < 1):
            raise ValueError(f"kv_budget (--kv-budget): expected None or an integer >= 1, got {self.kv_budget!r}")
        if self.token_budget < self.max_length:
            raise ValueError(f"token_budget (--token-budget): expected >= max_length ({self.max_length}) so that "
                             f"one text of the largest accepted size fits a batch, got {self.token_budget}")
        if self.max_queue < self.max_items:
            raise ValueError(f"max_queue (--max-queue): expected >= max_items ({self.max_items}) so that one "
                             f"request of the largest accepted size can queue, got {self.max_queue}")

    def to_dict(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    """The ``doe serve`` flag of a setting (seconds go without their unit: ``--retry-after``)."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def _max_tokens(self) -> int:
    warnings.warn("ServeConfig.max_tokens is now max_length; the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return self.max_length


# the earlier attribute name, read-only (the constructor's keyword is the InitVar above)
ServeConfig.max_tokens = property(_max_tokens, doc="Deprecated: the earlier name of ``max_length``.")


def check_positions(model, experts: Sequence, config: ServeConfig) -> None:
    """Raise ValueError when the longest accepted input (soft prompt + ``max_length``, plus
    ``max_new_tokens`` on a decoder) does not fit the model's position table."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompts = [int(p.shape[0]) for e in experts for p in (e.prompt, e.dense_prompt) if p is not None]
    from doe.models import model_kind

    decoder = model_kind(model) == "decoder"
    longest = max(prompts, default=0) + config.max_length + (config.max_new_tokens if decoder else 0)
    if limit is not None and longest > limit:
        raise ValueError(f"{max(prompts, default=0)} soft prompt tokens + max_length {config.max_length}"
                         f"{f' + max_new_tokens {config.max_new_tokens}' if decoder else ''} = {longest} positions, "
                         f"but the model has {limit}")
