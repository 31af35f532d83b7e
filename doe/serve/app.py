"""The HTTP API: a FastAPI app around one ``UnplugAndPlay`` runtime and its batching worker.

    POST /v1/classify   one item or a list -> label, probability, task, routed, expert, latency
    POST /v1/generate   decoder models: greedy or sampled continuation, streamed as SSE if asked
    GET  /v1/experts    resident experts (task, keep ratio, fingerprint), the installed one(s), the model
    POST /v1/experts    load an expert folder from --expert-dir; DELETE /v1/experts/{name} unloads one
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions: the OpenAI API (decoders;
                        ``doe.serve.openai_api``), its errors in OpenAI's shape
    GET  /health        200 while the worker runs and the server takes work, else 503
    GET  /metrics       Prometheus text format

Errors are JSON ``{"kind": ..., "detail": ...}``:

- 400 malformed JSON (also: not UTF-8, or nested deeper than the parser goes); 415 a body that
  is not ``application/json``, empty or not;
- 422 a body that does not fit the schema (missing or extra fields, wrong types, with no
  coercion: ``"5"`` is not an integer nor ``true`` an id; an empty text, a lone surrogate in a
  text, no task on a server without a router, decoding settings out of range);
- 408 a body not complete ``body_timeout_s`` after its head, or a head not complete
  ``header_timeout_s`` after the connection opened or its previous answer (then closed);
- 404 an unknown task (the body lists ``tasks``), or /v1/generate on a model that is not a decoder;
- 413 a text over ``max_length`` tokens, a list over ``max_items`` items, a body over
  ``max_body_bytes``;
- 503 the queue is full (with Retry-After) or the server is shutting down;
- 500 a forward raised: the items of that batch fail, the model is restored, the rest go on.

A list is refused whole when one item is bad; the error names that item's index.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch.nn as nn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from doe.engine import GenerationEngine
from doe.expert import TaskExpert
from doe.models import model_kind, model_source
from doe.router import TaskRouter
from doe.runtime import UnplugAndPlay, check_experts
from doe.serve.batcher import Batcher
from doe.serve.classify import add_classify
from doe.serve.config import ServeConfig, check_positions
from doe.serve.errors import add_error_handlers
from doe.serve.experts_api import add_expert_admin
from doe.serve.generate import add_generate
from doe.serve.info import add_info
from doe.serve.openai_api import add_openai
from doe.serve.metrics import Metrics
from doe.serve.middleware import CountRequests, LimitBody
from doe.serve.schemas import ApiError
from doe.serve.state import ServerState

__all__ = ["create_app"]


def create_app(model: nn.Module, tokenizer, experts: Sequence[TaskExpert], *, router: Optional[TaskRouter] = None,
               threshold: float = 0.5, config: Optional[ServeConfig] = None,
               runtime_options: Optional[dict] = None, model_id: Optional[str] = None,
               expert_dir: Optional[Union[str, Path]] = None, metrics: Optional[Metrics] = None,
               experts_managed_by: Optional[str] = None) -> FastAPI:
    """The app serving ``experts`` on ``model``. Experts and router are checked here (ValueError).

    Args:
        model, tokenizer: the backbone (an encoder, or a decoder LM for generation and the
            OpenAI API, which batches generations continuously: ``doe.engine``).
        experts: one per task, each carrying its prompt (and head); none is fine on a decoder
            (the base model serves, and ``expert_dir`` may bring experts later).
        router, threshold: identify requests that name no task (see ``UnplugAndPlay``).
        config: batching, limits and shutdown settings.
        runtime_options: more keyword arguments for ``UnplugAndPlay``.
        model_id: the base model's id in the OpenAI API (default: the model's source name).
        expert_dir: the folder POST /v1/experts may load expert folders from (None: off).
        metrics: where the server's metrics go (default: a Prometheus registry of its own).
        experts_managed_by: where experts change instead (POST and DELETE /v1/experts then
            answer 409 naming it), as on Ray Serve, where every replica must agree.
    """
    config = config or ServeConfig()
    if (experts or router is not None or model_kind(model) != "decoder") and experts_managed_by is None:
        check_experts(experts, router)  # where experts are managed elsewhere, they come after the start
    if expert_dir is not None and not Path(expert_dir).is_dir():
        raise ValueError(f"expert_dir: expected a folder of expert folders, got {str(expert_dir)!r}")
    check_positions(model, experts, config)
    metrics = metrics or Metrics()
    runtime = UnplugAndPlay(model, tokenizer, router=router, threshold=threshold, max_batch=config.max_batch,
                            max_length=config.max_length, restore_when_idle=False, on_switch=metrics.observe_switch,
                            **(runtime_options or {}))
    served = {e.task: runtime.add_expert(e) for e in experts}
    batcher = Batcher(runtime, config, metrics, group_by_task=not (runtime_options or {}).get("mixed"))
    engine = None
    if runtime.kind == "decoder" and not runtime.compact:
        engine = GenerationEngine(runtime, max_batch=config.max_batch, kv_budget=config.kv_budget,
                                  max_queue=config.max_queue, on_step=metrics.observe_step, restore_when_idle=True)
        metrics.kv_budget.set(config.kv_budget or 0)
        metrics.generation_queue_depth.set_function(lambda: engine.queued)
    name = model_id or Path(model_source(model) or getattr(model.config, "model_type", None) or "base").name
    server = ServerState(runtime, batcher, metrics, config, served, runtime.kind, runtime.fingerprint,
                         getattr(getattr(model, "config", None), "model_type", None), threshold,
                         copy.deepcopy(tokenizer), engine=engine, model_id=name,
                         expert_dir=None if expert_dir is None else Path(expert_dir).resolve(),
                         experts_managed_by=experts_managed_by)
    for task in [None, *served]:
        server.served(task)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(batcher.warm_up)
        batcher.start()
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                await asyncio.to_thread(engine.stop, config.shutdown_timeout_s)
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

    app.add_middleware(LimitBody, limit=config.max_body_bytes, refuse=too_large, timeout=config.body_timeout_s)
    app.add_middleware(CountRequests, metrics=metrics)

    add_error_handlers(app, server, too_large)
    add_classify(app, server)
    add_generate(app, server)
    add_info(app, server)
    add_expert_admin(app, server)
    add_openai(app, server)
    return app


_MOVED = {"ClassifyItem", "ClassifyResult", "GenerateRequest", "GenerateResult", "ErrorBody"}


def __getattr__(name: str):
    if name in _MOVED:  # the request and response schemas' earlier home
        import warnings

        from doe.serve import schemas

        warnings.warn(f"doe.serve.app.{name} is now doe.serve.schemas.{name}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(schemas, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
