"""GET /v1/experts (resident experts and the model), /health and /metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from doe.serve.state import ServerState

__all__ = ["add_info"]


def add_info(app: FastAPI, server: ServerState) -> None:
    config, batcher, metrics, router = server.config, server.batcher, server.metrics, server.runtime.router

    @app.get("/v1/experts", summary="Resident experts and the model")
    async def list_experts():
        return {
            "model": {"type": server.model_type, "kind": server.kind,
                      "fingerprint": server.fingerprint, "generate": server.kind == "decoder",
                      "compact_weight_bytes": server.runtime.compact_weight_bytes},
            "router": None if router is None else {"tasks": router.tasks, "threshold": server.threshold},
            "installed": server.runtime.installed_tasks(),
            # "neurons": the earlier name of "num_neurons", kept for one release
            "experts": [{**e.summary(), "task": task, "neurons": sum(e.num_neurons)} for task, e in server.experts.items()],
        }

    @app.get("/health", summary="200 while serving, 503 when shutting down or the worker stopped")
    async def health():
        closing = app.state.draining or batcher.stopping
        engine = server.engine
        ok = batcher.alive and (engine is None or engine.alive) and not closing
        body = {"status": "ok" if ok else ("shutting_down" if closing else "worker_stopped"),
                "queue_depth": batcher.depth, "max_queue": config.max_queue, "tasks": server.tasks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
