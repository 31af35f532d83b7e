"""Progress display: one bar per phase, numbered by an overall step counter.

    with doe.progress.steps(3):          # a command that knows its phases up front
        prompt_tune(...)                 # [1/3] prompt tuning reviews   ...
        score_neurons(...)               # [2/3] scoring neurons reviews ...
        ...

Outside ``steps`` a bar carries its phase name only. ``quiet_libraries`` silences the bars
and info logs that datasets and transformers print on their own.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Optional

from tqdm.auto import tqdm

__all__ = ["steps", "phase", "bar", "quiet_libraries"]


class _Counter:
    def __init__(self, total: int):
        self.total, self.done = total, 0


_COUNTER: contextvars.ContextVar[Optional[_Counter]] = contextvars.ContextVar("doe_progress_steps", default=None)


@contextlib.contextmanager
def steps(total: int):
    """Number the phases started inside as ``[k/total]``."""
    if total < 1:
        raise ValueError(f"steps: expected a positive number of phases, got {total}")
    token = _COUNTER.set(_Counter(total))
    try:
        yield
    finally:
        _COUNTER.reset(token)


def phase(name: str) -> str:
    """``name`` prefixed with the next step number (``[2/5] name``) inside ``steps``, else ``name``."""
    counter = _COUNTER.get()
    if counter is None:
        return name
    counter.done += 1
    return f"[{min(counter.done, counter.total)}/{counter.total}] {name}"


def bar(name: str, *, total: Optional[int] = None, iterable: Optional[Iterable] = None, enabled: bool = True):
    """A tqdm bar for one phase (counted by ``steps``), cleared when it closes."""
    return tqdm(iterable, total=total, desc=phase(name), disable=not enabled, leave=False, dynamic_ncols=True)


def quiet_libraries() -> None:
    """Silence the progress bars and info logs of datasets and transformers (errors still show)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
