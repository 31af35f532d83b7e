"""Dynamic batching: a bounded queue filled by the event loop and one worker thread that owns
the model.

The event loop only appends jobs and awaits their futures; the worker takes the oldest job,
gathers the queued jobs that may share its batch (same task, up to ``max_batch`` items and
``token_budget`` padded tokens, waiting at most ``max_wait_ms`` for the batch to fill), hands
the batch to ``UnplugAndPlay.process`` whole and answers each job's future on the loop.
When the queue runs dry the worker restores the original model (the paper's fourth step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

from doe.runtime import Request, Result, UnplugAndPlay
from doe.serve.config import ServeConfig
from doe.serve.metrics import Metrics
from doe.worker import Worker

__all__ = ["Batcher", "Job", "QueueFull", "ShuttingDown", "InferenceFailed"]

log = logging.getLogger("doe.serve")


class QueueFull(Exception):
    """The queue cannot take the request's items now (answered 503 with Retry-After)."""


class ShuttingDown(Exception):
    """The server stopped taking work (answered 503)."""


class InferenceFailed(Exception):
    """The forward of a job's batch raised (answered 500); the message names the error."""


@dataclass(eq=False)
class Job:
    """One queued item: a classification request, or a call that runs alone on the worker.

    key: jobs with equal keys may share a batch (None for a call). tokens: its text tokens.
    """

    loop: asyncio.AbstractEventLoop
    request: Optional[Request] = None
    call: Optional[Callable[[], Any]] = None
    key: Hashable = None
    tokens: int = 0
    future: asyncio.Future = field(init=False)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancelled: bool = False  # set by the loop when nobody waits for the answer any more

    def __post_init__(self) -> None:
        if (self.request is None) == (self.call is None):
            raise ValueError("Job: expected exactly one of request and call")
        self.future = self.loop.create_future()

    def resolve(self, value: Any) -> None:
        """Answer from the worker thread: a Result, a value, or an exception instance."""
        try:
            self.loop.call_soon_threadsafe(self._set, value)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def _set(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)


class Batcher(Worker):
    """The queue and the worker thread that owns ``runtime.model``.

    group_by_task: only same-task (or, for routed requests, same "no task") jobs share a
    batch; False hands mixed batches to a runtime that runs them as one.
    """

    thread_name = "doe-serve-worker"

    def __init__(self, runtime: UnplugAndPlay, config: ServeConfig, metrics: Metrics, *,
                 group_by_task: bool = True):
        self.runtime, self.config, self.metrics = runtime, config, metrics
        self.group_by_task = group_by_task
        self._queue: list[Job] = []
        self._current: list[Job] = []  # the batch the worker runs now
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.admitted = 0  # items taken into the queue
        self.answered = 0  # items the worker answered (including errors)
        self.dropped = 0  # items taken out unanswered: their client went away
        metrics.queue_depth.set_function(lambda: self.depth)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def busy(self, task: str) -> int:
        """Items naming ``task`` queued or running."""
        with self._cond:
            jobs = self._queue + self._current
        return sum(j.request is not None and j.request.task == task for j in jobs)

    def warm_up(self) -> None:
        """One forward per task and back to the original model, before the worker starts (the
        first forwards pay one-time costs that a client should not see)."""
        if self._thread is not None:
            raise RuntimeError("Batcher.warm_up: the worker runs; warm up before start()")
        rt = self.runtime
        rt.process([Request("warm up", task=t) for t in rt.tasks])
        rt.switch(None)
        rt.reset_log()

    def key_of(self, task: Optional[str]) -> Hashable:
        return ("classify", task if self.group_by_task else None)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none (QueueFull / ShuttingDown)."""
        with self._cond:
            if self._stopping or not self.alive:
                raise ShuttingDown("the server is shutting down" if self._stopping else "the worker is not running")
            if len(self._queue) + len(jobs) > self.config.max_queue:
                raise QueueFull(f"the queue holds {len(self._queue)} of {self.config.max_queue} items; "
                                f"this request brings {len(jobs)}")
            self._queue.extend(jobs)
            self.admitted += len(jobs)
            self._cond.notify()

    # ------------------------------------------------------------------ worker

    def _select(self) -> tuple[list[Job], bool]:
        """The batch of the oldest job and whether it is full."""
        head = self._queue[0]
        if head.call is not None:
            return [head], True
        batch: list[Job] = []
        longest = 0
        for job in self._queue:
            if job.call is not None or job.key != head.key:
                continue
            if batch and (len(batch) + 1) * max(longest, job.tokens) > self.config.token_budget:
                return batch, True
            batch.append(job)
            longest = max(longest, job.tokens)
            if len(batch) == self.config.max_batch:
                return batch, True
        return batch, False

    def _take(self) -> Optional[list[Job]]:
        """Block until a batch is ready; None once stopping and the queue is empty."""
        with self._cond:
            while True:
                if any(j.cancelled for j in self._queue):
                    kept = [j for j in self._queue if not j.cancelled]
                    self.dropped += len(self._queue) - len(kept)
                    self._queue[:] = kept
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                batch, full = self._select()
                left = self._queue[0].enqueued + self.config.max_wait_ms / 1000 - time.perf_counter()
                if full or left <= 0 or self._stopping:
                    taken = {id(j) for j in batch}
                    self._queue[:] = [j for j in self._queue if id(j) not in taken]
                    self._current = batch
                    return batch
                self._cond.wait(left)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                break
            now = time.perf_counter()
            for job in batch:
                job.started = now
                self.metrics.queue_wait.observe(now - job.enqueued)
            try:
                if batch[0].call is not None:
                    self._call(batch[0])
                else:
                    self._classify(batch)
            except Exception as exc:  # a bug here must not end the worker
                log.exception("worker: batch failed")
                for job in batch:
                    job.resolve(InferenceFailed(f"{type(exc).__name__}: {exc}"))
                self.restore()
            self.answered += len(batch)
            with self._cond:
                self._current = []
            if not self._queue:
                self.restore()
        self.restore()

    def _call(self, job: Job) -> None:
        try:
            value = job.call()
        except Exception as exc:
            value = InferenceFailed(f"{type(exc).__name__}: {exc}")
            self.restore()
        job.resolve(value)

    def _classify(self, batch: list[Job]) -> None:
        rt = self.runtime
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(len(batch) * max(j.tokens for j in batch))
        try:
            results: list[Any] = rt.process([j.request for j in batch])
            failed = any(r.error is not None for r in results)
        except Exception as exc:  # process raises only for what it cannot attribute to a group
            results, failed = [InferenceFailed(f"{type(exc).__name__}: {exc}")] * len(batch), True
        if failed:
            self.restore()
        # One observation per forward. The items that reached one (batch_size > 0; an item refused
        # before, e.g. by the router, has 0) come in order, the rows of each forward together.
        ran = [r for r in results if isinstance(r, Result) and r.batch_size > 0]
        i = 0
        while i < len(ran):
            if ran[i].error is None:
                task = ran[i].task if self.group_by_task else "mixed"
                self.metrics.forward.labels(task=task).observe(ran[i].latency_ms / 1000)
            i += ran[i].batch_size
        for job, result in zip(batch, results):
            if isinstance(result, Result) and result.error is not None:
                result = InferenceFailed(result.error)
            job.resolve(result)

    def restore(self) -> None:
        """Put the original model back (after a failure, and when the queue is empty: the one
        place the server restores; its runtime does not restore after each call)."""
        self.runtime.switch(None)
