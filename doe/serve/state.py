"""The state the endpoints share and the waiting they have in common (answers, disconnects)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse

from doe.expert import TaskExpert
from doe.requests import text_tokens
from doe.runtime import UnplugAndPlay
from doe.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from doe.serve.config import ServeConfig
from doe.serve.metrics import Metrics
from doe.serve.schemas import ApiError

__all__ = ["ServerState", "await_answers", "disconnected", "failed", "CHARS_PER_TOKEN", "DISCONNECTED"]

CHARS_PER_TOKEN = 32  # texts longer than this many characters per allowed token are refused untokenized
DISCONNECTED = 499  # nginx's "client closed request": seen only in metrics, nobody reads it


@dataclass
class ServerState:
    """What the endpoints share: the runtime, its worker, metrics, settings and the served experts."""

    runtime: UnplugAndPlay
    batcher: Batcher
    metrics: Metrics
    config: ServeConfig
    experts: dict[str, TaskExpert]
    kind: str
    fingerprint: str
    model_type: Optional[str]
    threshold: float
    loop_tokenizer: Any  # a tokenizer of the loop's own: a fast tokenizer's padding state is not thread-safe
    engine: Any = None  # doe.engine.GenerationEngine on a decoder, else None
    model_id: str = "base"  # the base model's name in the OpenAI API
    expert_dir: Optional[Path] = None  # where POST /v1/experts may load from (None: off)
    created: dict = field(default_factory=dict)  # model id -> unix time it was loaded
    removing: set = field(default_factory=set)  # experts being unloaded: new requests get 404
    experts_managed_by: Optional[str] = None  # where experts change instead of POST/DELETE /v1/experts

    @property
    def tasks(self) -> list[str]:
        return sorted(self.runtime.tasks)

    def error(self, exc: ApiError) -> JSONResponse:
        self.metrics.errors.labels(kind=exc.kind).inc()
        return JSONResponse({"kind": exc.kind, "detail": exc.detail, **exc.extra}, status_code=exc.status,
                            headers=exc.headers)

    def check_task(self, task: Optional[str], *, routable: bool, item: Optional[int] = None) -> None:
        """422 no task and no router, 404 an unknown task; ``item``: the index that prefixes the detail."""
        where = "" if item is None else f"item {item}: "
        if task is None:
            if routable and self.runtime.router is None:
                raise ApiError(422, "invalid_request", f"{where}no 'task' given and this server has no router; give "
                               f"one of {self.tasks}", tasks=self.tasks)
        elif task not in self.experts or task in self.removing:
            raise ApiError(404, "unknown_task", f"{where}unknown task {task!r}; this server serves {self.tasks}",
                           tasks=self.tasks)

    def count_tokens(self, texts: Sequence[str], pairs: Sequence[Optional[str]]) -> list[int]:
        """Tokens per text (with its pair); 413 when one is over ``max_length``."""
        limit = self.config.max_length
        for i, (t, p) in enumerate(zip(texts, pairs)):
            chars = len(t) + len(p or "")
            if chars > CHARS_PER_TOKEN * limit:
                raise ApiError(413, "too_large", f"item {i}: {chars} characters; this server takes at most {limit} "
                               f"tokens per text (and never more than {CHARS_PER_TOKEN * limit} characters)")
        counts = [text_tokens(self.loop_tokenizer, t, p) for t, p in zip(texts, pairs)]
        for i, n in enumerate(counts):
            if n > limit:
                raise ApiError(413, "too_large", f"item {i}: {n} tokens; this server takes at most {limit} tokens "
                               "per text (--max-length)")
        return counts

    def served(self, task: Optional[str]) -> None:
        """Note when a model id (the base model, or an expert) became available."""
        self.created.setdefault(self.model_id if task is None else task, int(time.time()))

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.batcher.submit(jobs)
        except QueueFull as exc:
            raise ApiError(503, "queue_full", f"server busy: {exc}; retry later",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from exc
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc)) from exc


async def disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_answers(server: ServerState, request: Request, jobs: list[Job]) -> Optional[list[Any]]:
    """The jobs' answers, or None when the client disconnected first (its queued jobs are dropped)."""
    pending = {j.future for j in jobs}
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while pending and not gone.done():
            done, _ = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
    finally:
        gone.cancel()
    if not pending:
        return [j.future.result() for j in jobs]
    for job in jobs:
        job.cancelled = True
    server.metrics.errors.labels(kind="disconnected").inc()
    return None


def failed(answers: list[Any]) -> None:
    errors = sorted({str(a) for a in answers if isinstance(a, Exception)})
    if errors:
        raise ApiError(500, "inference_error", "; ".join(errors))
