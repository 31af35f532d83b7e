"""POST /v1/generate: decoder models continue a prompt, greedy or sampled, streamed as SSE if asked."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from doe.generation import GenerateParams, Generation
from doe.serve.batcher import Job
from doe.serve.schemas import ERROR_RESPONSES, ApiError, GenerateRequest, GenerateResult
from doe.serve.state import DISCONNECTED, ServerState, await_answers, disconnected, failed

__all__ = ["add_generate"]


def add_generate(app: FastAPI, server: ServerState) -> None:
    config, metrics = server.config, server.metrics

    @app.post("/v1/generate", response_model=GenerateResult, responses=ERROR_RESPONSES,
              summary="Continue a prompt (decoder models)")
    async def generate_text(request: Request, body: GenerateRequest):
        t0 = time.perf_counter()
        if server.kind != "decoder":
            raise ApiError(404, "not_a_decoder", f"this server's model is {server.kind} "
                           f"({server.model_type or '?'}); /v1/generate needs a decoder LM")
        server.check_task(body.task, routable=False)
        if body.max_new_tokens > config.max_new_tokens:
            raise ApiError(422, "invalid_request", f"max_new_tokens: expected at most {config.max_new_tokens} "
                           f"(--max-new-tokens), got {body.max_new_tokens}")
        prompt_tokens = server.count_tokens([body.prompt], [None])[0]
        params = GenerateParams(body.prompt, body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def run() -> Generation:
            push = (lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)) if body.stream else None
            return server.runtime.generate(params, task=body.task, on_token=push, should_stop=lambda: job.cancelled)

        job = Job(loop, call=run, tokens=prompt_tokens)
        server.submit([job])
        served_by = body.task or "dense"

        def result(g: Generation) -> GenerateResult:
            metrics.generated_tokens.labels(task=served_by).inc(len(g.token_ids))
            metrics.latency.labels(task=served_by).observe(time.perf_counter() - t0)
            return GenerateResult(text=g.text, token_ids=g.token_ids, task=body.task, expert=served_by,
                                  prompt_tokens=g.prompt_tokens, finish_reason=g.finish_reason,
                                  latency_ms=1000 * (time.perf_counter() - t0),
                                  queue_ms=1000 * max(job.started - job.enqueued, 0.0))

        if body.stream:
            return StreamingResponse(_sse(request, job, tokens, result), media_type="text/event-stream")
        answers = await await_answers(server, request, [job])
        if answers is None:
            return Response(status_code=DISCONNECTED)
        failed(answers)
        return result(answers[0])

    async def _sse(request: Request, job: Job, tokens: asyncio.Queue, result):
        """One ``data:`` event per token, then a final one with ``done`` (or an ``error`` event)."""
        ids: list[int] = []
        text = ""
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while not (job.future.done() and tokens.empty()):
                getter = asyncio.ensure_future(tokens.get())
                await asyncio.wait({getter, job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    getter.cancel()
                    return
                if not getter.done():
                    getter.cancel()  # the answer came; the loop takes the tokens still queued
                    continue
                ids.append(getter.result())
                new = server.loop_tokenizer.decode(ids, skip_special_tokens=True)
                yield f"data: {json.dumps({'token_id': ids[-1], 'text': new[len(text):]})}\n\n"
                text = new
            answer = job.future.result()
            if isinstance(answer, Exception):
                metrics.errors.labels(kind="inference_error").inc()
                yield f"event: error\ndata: {json.dumps({'kind': 'inference_error', 'detail': str(answer)})}\n\n"
                return
            yield f"data: {json.dumps({'done': True, **result(answer).model_dump()})}\n\n"
        finally:
            gone.cancel()
            if not job.future.done():  # the client went away: stop generating
                job.cancelled = True
                metrics.errors.labels(kind="disconnected").inc()
