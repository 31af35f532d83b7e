"""POST /v1/generate: decoder models continue a prompt, greedy or sampled, streamed as SSE if
asked; the continuous-batching engine runs it next to every other generation."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from doe.generation import GenerateParams
from doe.serve.schemas import ERROR_RESPONSES, ApiError, GenerateRequest, GenerateResult
from doe.serve.state import DISCONNECTED, ServerState, disconnected
from doe.serve.streams import GenerationStream, start_generations

__all__ = ["add_generate", "wait_or_leave"]


async def wait_or_leave(request: Request, stream: GenerationStream):
    """The finished handle, or None when the client went away first (the generation is cancelled)."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({stream.done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if stream.done.done():
        return stream.done.result()
    stream.cancel()
    stream.server.metrics.errors.labels(kind="disconnected").inc()
    return None


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
        server.count_tokens([body.prompt], [None])
        params = GenerateParams(body.prompt, body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed)
        ids = None if body.task is not None else server.loop_tokenizer(body.prompt)["input_ids"]
        stream = start_generations(server, [(params, body.task, ids)], tokens=body.stream)[0]
        served_by = body.task or "dense"

        def result(h) -> GenerateResult:
            if h.error is not None:
                raise ApiError(500, "inference_error", h.error)
            metrics.latency.labels(task=served_by).observe(time.perf_counter() - t0)
            return GenerateResult(text=h.text, token_ids=h.token_ids, task=body.task, expert=served_by,
                                  prompt_tokens=h.prompt_tokens, finish_reason=h.finish_reason,
                                  latency_ms=1000 * (time.perf_counter() - t0),
                                  queue_ms=1000 * max((h.started or h.finished) - h.submitted, 0.0))

        if body.stream:
            return StreamingResponse(_sse(request, stream, result), media_type="text/event-stream")
        h = await wait_or_leave(request, stream)
        if h is None:
            return Response(status_code=DISCONNECTED)
        return result(h)

    async def _sse(request: Request, stream: GenerationStream, result):
        """One ``data:`` event per token, then a final one with ``done`` (or an ``error`` event)."""
        ids: list[int] = []
        text = ""
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while not (stream.done.done() and stream.tokens.empty()):
                getter = asyncio.ensure_future(stream.tokens.get())
                await asyncio.wait({getter, stream.done, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    getter.cancel()
                    return
                if not getter.done():
                    getter.cancel()  # the end came; the loop takes the tokens still queued
                    continue
                ids.append(getter.result())
                new = server.loop_tokenizer.decode(ids, skip_special_tokens=True)
                yield f"data: {json.dumps({'token_id': ids[-1], 'text': new[len(text):]})}\n\n"
                text = new
            h = stream.done.result()
            if h.error is not None:
                metrics.errors.labels(kind="inference_error").inc()
                yield f"event: error\ndata: {json.dumps({'kind': 'inference_error', 'detail': h.error})}\n\n"
                return
            yield f"data: {json.dumps({'done': True, **result(h).model_dump()})}\n\n"
        finally:
            gone.cancel()
            if not stream.done.done():  # the client went away: stop generating
                stream.cancel()
                metrics.errors.labels(kind="disconnected").inc()
