"""POST /v1/experts (load an expert folder from the operator's ``--expert-dir``) and
DELETE /v1/experts/{name} (unload one once its requests are done), without a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Sequence

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from doe.expert import TaskExpert
from doe.runtime import check_experts
from doe.serve.config import check_positions
from doe.unplug import check_expert
from doe.serve.schemas import ERROR_RESPONSES, ApiError, Text
from doe.serve.state import ServerState

__all__ = ["LoadExpert", "add_expert", "add_expert_admin", "busy", "read_expert", "remove_experts"]


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


def read_expert(server: ServerState, folder: Path, name: str) -> TaskExpert:
    """The expert in ``folder`` (``name``: how the request named it), checked against the served
    model and settings without adding it (ApiError 422)."""
    try:
        expert = TaskExpert.from_pretrained(folder)
    except (ValueError, OSError) as exc:
        raise ApiError(422, "invalid_expert", f"{name!r} is not an expert folder: {exc}") from exc
    try:
        check_experts([expert])
        check_expert(server.runtime.model, expert)
        check_positions(server.runtime.model, [expert], server.config)
    except ValueError as exc:
        raise ApiError(422, "invalid_expert", f"{name!r}: {exc}") from exc
    return expert


async def add_expert(server: ServerState, expert: TaskExpert) -> TaskExpert:
    """Serve ``expert`` from now on (it was checked by ``read_expert``)."""
    try:
        added = await asyncio.to_thread(server.runtime.add_expert, expert)
    except ValueError as exc:
        raise ApiError(422, "invalid_expert", f"{expert.task!r}: {exc}") from exc
    server.experts[added.task] = added
    server.created[added.task] = int(time.time())
    return added


def check_removable(server: ServerState, name: str) -> None:
    """404 an expert not served (or already leaving), 409 one the router routes to."""
    if name not in server.experts or name in server.removing:
        raise ApiError(404, "unknown_task", f"unknown expert {name!r}; this server serves {server.tasks}",
                       tasks=server.tasks)
    if server.runtime.router is not None and name in server.runtime.router.tasks:
        raise ApiError(409, "expert_routed", f"the router routes requests to {name!r}; serve it with a router "
                       "that does not, then unload it")


def busy(server: ServerState, task: str) -> int:
    """Requests of ``task`` queued or running (classification and generation)."""
    return server.batcher.busy(task) + (server.engine.busy(task) if server.engine is not None else 0)


async def remove_experts(server: ServerState, names: Sequence[str]) -> None:
    """Stop taking requests for ``names`` (404 from now on), wait up to the shutdown timeout for
    theirs to end, then unload them all; 409 (nothing unloaded) when some are still busy."""
    for name in names:
        check_removable(server, name)
    server.removing.update(names)
    try:
        deadline = time.monotonic() + server.config.shutdown_timeout_s
        while any(busy(server, n) for n in names) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        still = [n for n in names if busy(server, n)]
        if still:
            raise ApiError(409, "expert_busy", f"{still} still have requests after {server.config.shutdown_timeout_s} "
                           "s (--shutdown-timeout); try again")
        for name in names:
            await asyncio.to_thread(server.runtime.remove_expert, name)
            del server.experts[name]
            server.created.pop(name, None)
    finally:
        server.removing.difference_update(names)


def add_expert_admin(app: FastAPI, server: ServerState) -> None:
    loading: set = set()  # names being loaded: a second load of one is a 409

    def managed() -> None:
        if server.experts_managed_by:
            raise ApiError(409, "experts_managed", "the experts of this server change through "
                           f"{server.experts_managed_by}, so that every replica serves the same ones")

    @app.post("/v1/experts", status_code=201, responses=ERROR_RESPONSES, summary="Load an expert from --expert-dir")
    async def load_expert(body: LoadExpert):
        managed()
        if server.expert_dir is None:
            raise ApiError(403, "loading_disabled", "this server loads no experts at run time; start it with "
                           "--expert-dir FOLDER to allow expert folders from FOLDER")
        folder = _inside(server.expert_dir, body.path)
        expert = await asyncio.to_thread(read_expert, server, folder, body.path)
        if expert.task in server.experts or expert.task in loading or expert.task == server.model_id:
            raise ApiError(409, "expert_exists", f"an expert named {expert.task!r} is already served; DELETE "
                           f"/v1/experts/{expert.task} first")
        loading.add(expert.task)
        try:
            added = await add_expert(server, expert)
        finally:
            loading.discard(expert.task)
        return {**added.summary(), "task": added.task, "id": added.task, "parent": server.model_id}

    @app.delete("/v1/experts/{name}", responses=ERROR_RESPONSES, summary="Unload an expert once its requests end")
    async def unload_expert(name: str):
        managed()
        await remove_experts(server, [name])
        return {"id": name, "object": "model", "deleted": True}
