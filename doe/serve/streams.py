"""Generations of the engine seen from the event loop: text pieces as they come, then the end,
with the per-expert metrics every generation endpoint records."""

from __future__ import annotations

import asyncio
import time
from typing import Optional, Sequence

from doe.engine import EngineFull, EngineStopped, GenerationHandle
from doe.generation import GenerateParams
from doe.serve.schemas import ApiError
from doe.serve.state import ServerState

__all__ = ["GenerationStream", "start_generations"]

DONE = object()


class GenerationStream:
    """One engine request: ``pieces`` gets each new text piece, then ``(DONE, handle)``."""

    def __init__(self, server: ServerState, loop: asyncio.AbstractEventLoop, label: str, tokens: bool = False):
        self.server, self.loop, self.label = server, loop, label
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.tokens: Optional[asyncio.Queue] = asyncio.Queue() if tokens else None  # each new token id, if asked
        self.done: asyncio.Future = loop.create_future()
        self.handle: Optional[GenerationHandle] = None
        self._last: Optional[float] = None

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed: nobody waits any more
            pass

    def on_text(self, piece: str) -> None:
        self._call(self.pieces.put_nowait, piece)

    def on_token(self, token: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.server.metrics.inter_token.labels(expert=self.label).observe(now - self._last)
        self._last = now
        if self.tokens is not None:
            self._call(self.tokens.put_nowait, token)

    def on_done(self, h: GenerationHandle) -> None:
        m = self.server.metrics
        m.generations.labels(expert=self.label).inc()
        m.prompt_tokens.labels(expert=self.label).inc(h.prompt_tokens)
        m.generated_tokens.labels(task=self.label).inc(len(h.token_ids))
        if h.started is not None:
            m.generation_queue.labels(expert=self.label).observe(h.started - h.submitted)
        if h.first_token is not None:
            m.first_token.labels(expert=self.label).observe(h.first_token - h.submitted)
        self._call(self._resolve, h)

    def _resolve(self, h: GenerationHandle) -> None:
        self.pieces.put_nowait((DONE, h))
        if not self.done.done():
            self.done.set_result(h)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def start_generations(server: ServerState, requests: Sequence[tuple[GenerateParams, Optional[str], Optional[list]]],
                      *, tokens: bool = False) -> list[GenerationStream]:
    """Submit (params, task or None for dense, prompt ids or None) requests to the engine, all or
    none: 503 with Retry-After when the queue is full, 503 when shutting down. tokens: each
    stream also queues its token ids (``GenerationStream.tokens``)."""
    loop = asyncio.get_running_loop()
    engine = server.engine
    if engine.queued + len(requests) > engine.max_queue:
        raise ApiError(503, "queue_full", f"server busy: the generation queue holds {engine.queued} of "
                       f"{engine.max_queue} requests and this one brings {len(requests)}; retry later",
                       headers={"Retry-After": str(server.config.retry_after_s)})
    streams = []
    try:
        for params, task, ids in requests:
            stream = GenerationStream(server, loop, task or server.model_id, tokens)
            stream.handle = engine.submit(params, task=task, prompt_ids=ids, on_text=stream.on_text,
                                          on_token=stream.on_token, on_done=stream.on_done)
            streams.append(stream)
    except (EngineFull, EngineStopped) as exc:
        for s in streams:
            s.cancel()
        if isinstance(exc, EngineStopped):
            raise ApiError(503, "shutting_down", str(exc)) from exc
        raise ApiError(503, "queue_full", f"server busy: {exc}; retry later",
                       headers={"Retry-After": str(server.config.retry_after_s)}) from exc
    return streams
