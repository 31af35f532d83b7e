"""POST /v1/experts (load an expert folder from the operator's ``--expert-dir``) and
DELETE /v1/experts/{name} (unload one once its requests are done), without a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from doe.expert import TaskExpert
from doe.serve.config import check_positions
from doe.serve.schemas import ERROR_RESPONSES, ApiError, Text
from doe.serve.state import ServerState

__all__ = ["add_expert_admin", "LoadExpert"]


class LoadExpert(BaseModel):
    """An expert folder, named relative to the server's --expert-dir."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: Text = Field(description="a folder inside --expert-dir, e.g. 'summarize' (never an absolute path)")


def _inside(root: Path, path: str) -> Path:
    """``root / path`` resolved, when it stays inside ``root``; else a 400."""
    if not path.strip() or Path(path).is_absolute() or "\\" in path:
        raise ApiError(400, "invalid_path", f"path: expected a folder name relative to --expert-dir, got {path!r}")
    folder = (root / path).resolve()
    if folder != root and root not in folder.parents:
        raise ApiError(400, "invalid_path", f"path: {path!r} leads outside --expert-dir")
    if not folder.is_dir():
        raise ApiError(404, "expert_not_found", f"no expert folder {path!r} in --expert-dir")
    return folder


def add_expert_admin(app: FastAPI, server: ServerState) -> None:
    runtime, engine, batcher = server.runtime, server.engine, server.batcher
    loading: set = set()  # names being loaded: a second load of one is a 409

    @app.post("/v1/experts", status_code=201, responses=ERROR_RESPONSES, summary="Load an expert from --expert-dir")
    async def load_expert(body: LoadExpert):
        if server.expert_dir is None:
            raise ApiError(403, "loading_disabled", "this server loads no experts at run time; start it with "
                           "--expert-dir FOLDER to allow expert folders from FOLDER")
        folder = _inside(server.expert_dir, body.path)
        try:
            expert = await asyncio.to_thread(TaskExpert.from_pretrained, folder)
        except (ValueError, OSError) as exc:
            raise ApiError(422, "invalid_expert", f"{body.path!r} is not an expert folder: {exc}") from exc
        if expert.task in server.experts or expert.task in loading or expert.task == server.model_id:
            raise ApiError(409, "expert_exists", f"an expert named {expert.task!r} is already served; DELETE "
                           f"/v1/experts/{expert.task} first")
        loading.add(expert.task)
        try:
            check_positions(runtime.model, [expert], server.config)
            added = await asyncio.to_thread(runtime.add_expert, expert)
        except ValueError as exc:
            raise ApiError(422, "invalid_expert", f"{body.path!r}: {exc}") from exc
        finally:
            loading.discard(expert.task)
        server.experts[added.task] = added
        server.created[added.task] = int(time.time())
        return {**added.summary(), "task": added.task, "id": added.task, "parent": server.model_id}

    def busy(task: str) -> int:
        return batcher.busy(task) + (engine.busy(task) if engine is not None else 0)

    @app.delete("/v1/experts/{name}", responses=ERROR_RESPONSES, summary="Unload an expert once its requests end")
    async def unload_expert(name: str):
        if name not in server.experts or name in server.removing:
            raise ApiError(404, "unknown_task", f"unknown expert {name!r}; this server serves {server.tasks}",
                           tasks=server.tasks)
        if runtime.router is not None and name in runtime.router.tasks:
            raise ApiError(409, "expert_routed", f"the router routes requests to {name!r}; serve it with a router "
                           "that does not, then unload it")
        server.removing.add(name)  # new requests for it get 404 from now on
        try:
            deadline = time.monotonic() + server.config.shutdown_timeout_s
            while busy(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if busy(name):
                raise ApiError(409, "expert_busy", f"{name!r} still has requests after "
                               f"{server.config.shutdown_timeout_s} s (--shutdown-timeout); try again")
            await asyncio.to_thread(runtime.remove_expert, name)
            del server.experts[name]
            server.created.pop(name, None)
        finally:
            server.removing.discard(name)
        return {"id": name, "object": "model", "deleted": True}
