"""The HTTP API: a FastAPI app around one ``UnplugAndPlay`` runtime and its batching worker.

    POST /v1/classify   one item or a list -> label, probability, task, routed, expert, latency
    POST /v1/generate   decoder models: greedy or sampled continuation, streamed as SSE if asked
    GET  /v1/experts    resident experts (task, keep ratio, fingerprint), the installed one(s), the model
    GET  /health        200 while the worker runs and the server takes work, else 503
    GET  /metrics       Prometheus text format

Errors are JSON ``{"kind": ..., "detail": ...}``:

- 400 malformed JSON; 415 a body that is not ``application/json``;
- 422 a body that does not fit the schema (missing or extra fields, wrong types, an empty text,
  no task on a server without a router, decoding settings out of range);
- 404 an unknown task (the body lists ``tasks``), or /v1/generate on a model that is not a decoder;
- 413 a text over ``max_length`` tokens, a list over ``max_items`` items, a body over
  ``max_body_bytes``;
- 503 the queue is full (with Retry-After) or the server is shutting down;
- 500 a forward raised: the items of that batch fail, the model is restored, the rest go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Sequence, Union

import torch.nn as nn
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from doe.expert import TaskExpert
from doe.generation import GenerateParams, Generation
from doe.models import model_kind
from doe.router import TaskRouter
from doe.runtime import Request as RuntimeRequest
from doe.runtime import Result, UnplugAndPlay, check_experts, text_tokens
from doe.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from doe.serve.config import ServeConfig
from doe.serve.metrics import Metrics

__all__ = ["create_app", "check_positions", "ClassifyItem", "ClassifyResult", "GenerateRequest",
           "GenerateResult", "ErrorBody"]

ENDPOINTS = ("/v1/classify", "/v1/generate", "/v1/experts", "/health", "/metrics")
CHARS_PER_TOKEN = 32  # texts longer than this many characters per allowed token are refused untokenized
DISCONNECTED = 499  # nginx's "client closed request": seen only in metrics, nobody reads it


# ---------------------------------------------------------------------------------- schemas


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty text, got only whitespace" if value else "expected a non-empty text")
    return value


class ClassifyItem(BaseModel):
    """One text to classify. Without ``task`` the router picks one."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the text to classify")
    text_pair: Optional[str] = Field(None, description="second text, for pair tasks")
    task: Optional[str] = Field(None, description="a task this server serves (GET /v1/experts); omit to route")
    id: Optional[Union[int, str]] = Field(None, description="echoed back in the result")

    _text = field_validator("text")(_not_blank)


class ClassifyResult(BaseModel):
    id: Optional[Union[int, str]] = None
    task: str = Field(description="the task that served the item")
    label: str
    label_id: int
    probability: float = Field(description="softmax probability of the label")
    routed: bool = Field(description="the task was identified from the text by the router")
    route_confidence: Optional[float] = Field(None, description="the router's confidence, when routed")
    expert: str = Field(description="the expert that served it (its task), or 'dense' below the threshold")
    latency_ms: float = Field(description="receipt to answer, on the server")
    queue_ms: float = Field(description="time waiting for the worker")
    forward_ms: float = Field(description="switch + forward of the item's batch")
    switch_ms: float
    batch_size: int


class GenerateRequest(BaseModel):
    """Continue ``prompt``; with ``task`` on that task's expert with its soft prompt, else dense."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    task: Optional[str] = None
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0: greedy")
    top_k: int = Field(0, ge=0, description="0: off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: bool = Field(False, description="answer as server-sent events, one per token")

    _prompt = field_validator("prompt")(_not_blank)


class GenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    task: Optional[str]
    expert: str
    prompt_tokens: int
    finish_reason: str = Field(description="stop (end-of-sequence token) or length")
    latency_ms: float
    queue_ms: float


class ErrorBody(BaseModel):
    kind: str = Field(description="malformed_json, invalid_request, unknown_task, too_large, queue_full, "
                      "shutting_down, inference_error, not_found, ...")
    detail: Any
    tasks: Optional[list[str]] = Field(None, description="the tasks served (unknown_task)")


class ApiError(Exception):
    def __init__(self, status: int, kind: str, detail: Any, headers: Optional[dict] = None, **extra):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers, self.extra = status, kind, detail, headers, extra


_ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 500, 503)}

# ---------------------------------------------------------------------------------- state


@dataclass
class _Server:
    runtime: UnplugAndPlay
    batcher: Batcher
    metrics: Metrics
    config: ServeConfig
    experts: dict[str, TaskExpert]
    kind: str
    fingerprint: str
    loop_tokenizer: Any  # a tokenizer of the loop's own: a fast tokenizer's padding state is not thread-safe

    @property
    def tasks(self) -> list[str]:
        return sorted(self.runtime.tasks)

    def error(self, exc: ApiError) -> JSONResponse:
        self.metrics.errors.labels(kind=exc.kind).inc()
        return JSONResponse({"kind": exc.kind, "detail": exc.detail, **exc.extra}, status_code=exc.status,
                            headers=exc.headers)

    def check_task(self, task: Optional[str], *, routable: bool) -> None:
        if task is None:
            if routable and self.runtime.router is None:
                raise ApiError(422, "invalid_request", f"no 'task' given and this server has no router; give one "
                               f"of {self.tasks}", tasks=self.tasks)
        elif task not in self.experts:
            raise ApiError(404, "unknown_task", f"unknown task {task!r}; this server serves {self.tasks}",
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
                               "per text (--max-tokens)")
        return counts

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.batcher.submit(jobs)
        except QueueFull as exc:
            raise ApiError(503, "queue_full", f"server busy: {exc}; retry later",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from exc
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc)) from exc


class BodyTooLarge(Exception):
    """A request body over ``max_body_bytes`` (answered 413)."""


class _LimitBody:
    """ASGI middleware: a body over ``limit`` bytes is refused, by its Content-Length before it
    is read, else (chunked) once the bytes read pass the limit."""

    def __init__(self, app, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(int(length))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(seen)
            return message

        await self.app(scope, counted, send)


class _CountRequests:
    """ASGI middleware: requests by endpoint and status, and how many are in flight."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answers(server: _Server, request: Request, jobs: list[Job]) -> Optional[list[Any]]:
    """The jobs' answers, or None when the client disconnected first (its queued jobs are dropped)."""
    pending = {j.future for j in jobs}
    gone = asyncio.ensure_future(_disconnected(request))
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


def _failed(answers: list[Any]) -> None:
    errors = sorted({str(a) for a in answers if isinstance(a, Exception)})
    if errors:
        raise ApiError(500, "inference_error", "; ".join(errors))


# ---------------------------------------------------------------------------------- app


def check_positions(model: nn.Module, experts: Sequence[TaskExpert], config: ServeConfig) -> None:
    """Raise ValueError when the longest accepted input (soft prompt + ``max_length``, plus
    ``max_new_tokens`` on a decoder) does not fit the model's position table."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompts = [int(p.shape[0]) for e in experts for p in (e.prompt, e.dense_prompt) if p is not None]
    decoder = model_kind(model) == "decoder"
    longest = max(prompts, default=0) + config.max_length + (config.max_new_tokens if decoder else 0)
    if limit is not None and longest > limit:
        raise ValueError(f"{max(prompts, default=0)} soft prompt tokens + max_length {config.max_length}"
                         f"{f' + max_new_tokens {config.max_new_tokens}' if decoder else ''} = {longest} positions, "
                         f"but the model has {limit}")


def create_app(model: nn.Module, tokenizer, experts: Sequence[TaskExpert], *, router: Optional[TaskRouter] = None,
               threshold: float = 0.5, config: Optional[ServeConfig] = None,
               runtime_options: Optional[dict] = None) -> FastAPI:
    """The app serving ``experts`` on ``model``. Experts and router are checked here (ValueError).

    Args:
        model, tokenizer: the backbone (an encoder, or a decoder LM for /v1/generate).
        experts: one per task, each carrying its prompt (and head).
        router, threshold: identify requests that name no task (see ``UnplugAndPlay``).
        config: batching, limits and shutdown settings.
        runtime_options: more keyword arguments for ``UnplugAndPlay``.
    """
    config = config or ServeConfig()
    check_experts(experts, router)
    check_positions(model, experts, config)
    metrics = Metrics()
    runtime = UnplugAndPlay(model, tokenizer, router=router, threshold=threshold, max_batch=config.max_batch,
                            max_length=config.max_length, restore_when_idle=False, on_switch=metrics.observe_switch,
                            **(runtime_options or {}))
    served = {e.task: runtime.add_expert(e) for e in experts}
    batcher = Batcher(runtime, config, metrics, group_by_task=not (runtime_options or {}).get("mixed"))
    server = _Server(runtime, batcher, metrics, config, served, runtime.kind, runtime.fingerprint,
                     copy.deepcopy(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(batcher.warm_up)
        batcher.start()
        try:
            yield
        finally:
            ended = await asyncio.to_thread(batcher.stop, config.shutdown_timeout_s)
            print(f"doe serve: stopped; {batcher.admitted} items admitted, {batcher.answered} answered, "
                  f"{batcher.dropped} dropped (their clients went away)"
                  f"{'' if ended else ', worker still busy at the shutdown timeout'}", file=sys.stderr, flush=True)

    app = FastAPI(title="DoE: unplug-and-play serving",
                  description="Many tasks from one transformer, each request run on its task's expert "
                  "(the FFN neurons the task needs).", lifespan=lifespan)
    app.state.doe = server
    app.state.draining = False

    def too_large(size: int) -> JSONResponse:
        return server.error(ApiError(413, "too_large", f"request body of {size}+ bytes; this server takes at most "
                                     f"{config.max_body_bytes} (--max-body-bytes)"))

    app.add_middleware(_LimitBody, limit=config.max_body_bytes, refuse=too_large)
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return server.error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if exc.body is not None and media != "application/json":
            return server.error(ApiError(415, "unsupported_media_type", "expected Content-Type: application/json, "
                                         f"got {media or 'none'}"))
        if any(e.get("type") == "json_invalid" for e in errors):
            return server.error(ApiError(400, "malformed_json", f"the body is not valid JSON: "
                                         f"{errors[0].get('ctx', {}).get('error', errors[0].get('msg'))}"))
        return server.error(ApiError(422, "invalid_request", _readable(errors, exc.body)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ClientDisconnect):  # gone while sending the body
            metrics.errors.labels(kind="disconnected").inc()
            return Response(status_code=DISCONNECTED)
        if isinstance(exc.__cause__, BodyTooLarge):
            return too_large(exc.__cause__.args[0])
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return server.error(ApiError(exc.status_code, kind, exc.detail, headers=getattr(exc, "headers", None)))

    @app.post("/v1/classify", response_model=Union[ClassifyResult, list[ClassifyResult]], responses=_ERRORS,
              summary="Classify one text or a list")
    async def classify(request: Request,
                       body: Annotated[Union[ClassifyItem, Annotated[list[ClassifyItem], Field(min_length=1)]],
                                       Body()]):
        t0 = time.perf_counter()
        items = body if isinstance(body, list) else [body]
        if len(items) > config.max_items:
            raise ApiError(413, "too_large", f"{len(items)} items in one request; this server takes at most "
                           f"{config.max_items} (--max-items)")
        for item in items:
            server.check_task(item.task, routable=True)
        counts = server.count_tokens([i.text for i in items], [i.text_pair for i in items])
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, request=RuntimeRequest(i.text, i.text_pair, i.task, id=n), key=batcher.key_of(i.task),
                    tokens=c) for n, (i, c) in enumerate(zip(items, counts))]
        server.submit(jobs)
        answers = await _answers(server, request, jobs)
        if answers is None:
            return Response(status_code=DISCONNECTED)
        _failed(answers)
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

    @app.post("/v1/generate", response_model=GenerateResult, responses=_ERRORS,
              summary="Continue a prompt (decoder models)")
    async def generate_text(request: Request, body: GenerateRequest):
        t0 = time.perf_counter()
        if server.kind != "decoder":
            raise ApiError(404, "not_a_decoder", f"this server's model is {server.kind} "
                           f"({getattr(model.config, 'model_type', '?')}); /v1/generate needs a decoder LM")
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
            return runtime.generate(params, task=body.task, on_token=push, should_stop=lambda: job.cancelled)

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
        answers = await _answers(server, request, [job])
        if answers is None:
            return Response(status_code=DISCONNECTED)
        _failed(answers)
        return result(answers[0])

    async def _sse(request: Request, job: Job, tokens: asyncio.Queue, result):
        """One ``data:`` event per token, then a final one with ``done`` (or an ``error`` event)."""
        ids: list[int] = []
        text = ""
        gone = asyncio.ensure_future(_disconnected(request))
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

    @app.get("/v1/experts", summary="Resident experts and the model")
    async def list_experts():
        return {
            "model": {"type": getattr(getattr(model, "config", None), "model_type", None), "kind": server.kind,
                      "fingerprint": server.fingerprint, "generate": server.kind == "decoder",
                      "compact_weight_bytes": runtime.summary()["compact_weight_bytes"]},
            "router": None if runtime.router is None else {"tasks": runtime.router.tasks, "threshold": threshold},
            "installed": runtime.installed_tasks(),
            # "neurons": the earlier name of "num_neurons", kept for one release
            "experts": [{**e.summary(), "task": task, "neurons": sum(e.num_neurons)} for task, e in served.items()],
        }

    @app.get("/health", summary="200 while serving, 503 when shutting down or the worker stopped")
    async def health():
        closing = app.state.draining or batcher.stopping
        ok = batcher.alive and not closing
        body = {"status": "ok" if ok else ("shutting_down" if closing else "worker_stopped"),
                "queue_depth": batcher.depth, "max_queue": config.max_queue, "tasks": server.tasks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _readable(errors: list[dict], body: Any) -> list[dict]:
    """Validation errors as {loc, msg, type}; for the one-or-many classify body, only those of
    the branch the body's JSON type selects."""
    branches = {"ClassifyItem": dict, "list[ClassifyItem]": list}
    if any(len(e["loc"]) > 1 and e["loc"][1] in branches for e in errors):
        if not isinstance(body, (dict, list)):
            return [{"loc": ["body"], "msg": f"expected a JSON object or a list of objects, got "
                     f"{type(body).__name__}", "type": "body_type"}]
        errors = [dict(e, loc=(e["loc"][0], *e["loc"][2:])) for e in errors
                  if len(e["loc"]) < 2 or e["loc"][1] not in branches or isinstance(body, branches[e["loc"][1]])]
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
