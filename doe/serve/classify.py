"""POST /v1/classify: one item or a list -> label, probability, task, routed, expert, latency."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Union

from fastapi import Body, FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from doe.runtime import Request as RuntimeRequest
from doe.runtime import Result
from doe.serve.batcher import Job
from doe.serve.schemas import ERROR_RESPONSES, ApiError, ClassifyItem, ClassifyResult
from doe.serve.state import DISCONNECTED, ServerState, await_answers, failed

__all__ = ["add_classify"]


def add_classify(app: FastAPI, server: ServerState) -> None:
    config, batcher, metrics = server.config, server.batcher, server.metrics

    @app.post("/v1/classify", response_model=Union[ClassifyResult, list[ClassifyResult]], responses=ERROR_RESPONSES,
              summary="Classify one text or a list")
    async def classify(request: Request,
                       body: Annotated[Union[ClassifyItem, Annotated[list[ClassifyItem], Field(min_length=1)]],
                                       Body()]):
        """Classify one item, or a list answered in its order. A list is all or nothing: one bad
        item (schema, unknown task, too long) refuses the whole list, before any of it is
        queued, with an error that names the item's index (``loc`` or ``item N:``)."""
        t0 = time.perf_counter()
        items = body if isinstance(body, list) else [body]
        if len(items) > config.max_items:
            raise ApiError(413, "too_large", f"{len(items)} items in one request; this server takes at most "
                           f"{config.max_items} (--max-items)")
        for n, item in enumerate(items):
            server.check_task(item.task, routable=True, item=n if isinstance(body, list) else None)
            if item.task is not None and server.runtime._entries[item.task].spec.is_generation:
                where = f"item {n}: " if isinstance(body, list) else ""
                raise ApiError(422, "invalid_request", f"{where}task {item.task!r} generates text; send it to "
                               "/v1/completions, /v1/chat/completions or /v1/generate")
        counts = server.count_tokens([i.text for i in items], [i.text_pair for i in items])
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, request=RuntimeRequest(i.text, i.text_pair, i.task, id=n), key=batcher.key_of(i.task),
                    tokens=c) for n, (i, c) in enumerate(zip(items, counts))]
        server.submit(jobs)
        answers = await await_answers(server, request, jobs)
        if answers is None:
            return Response(status_code=DISCONNECTED)
        failed(answers)
        now = time.perf_counter()
        out = []
        for item, job, r in zip(items, jobs, answers):
            r: Result
            metrics.items.labels(task=r.task, expert=r.expert).inc()
            metrics.latency.labels(task=r.task).observe(now - t0)
            out.append(ClassifyResult(
                id=item.id, task=r.task, label=r.label, label_id=r.label_id, probability=r.probability,
                routed=r.routed, route_confidence=r.route_confidence, expert=r.expert,
                latency_ms=1000 * (now - t0), queue_ms=1000 * (job.started - job.enqueued), forward_ms=r.latency_ms,
                switch_ms=r.switch_ms, batch_size=r.batch_size))
        return out if isinstance(body, list) else out[0]
