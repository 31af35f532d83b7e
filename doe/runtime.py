"""The unplug-and-play runtime: one model, many task experts, the paper's four steps per request.

    rt = doe.UnplugAndPlay(model, tokenizer, router=router)
    rt.add_expert("experts/offline_sentiment")        # index lists + prompts resident, no weights
    results = rt.process([{"text": "Loved it."}, {"text": "Is it raining?", "task": "offline_question"}])

For each request: (1) receive it, (2) identify the task's expert (by name, else by the router;
below ``threshold`` the dense model serves it), (3) run it on the expert-localized model,
(4) restore the original model when the stream moves to a task with no expert or goes idle.
Consecutive requests for one task run as one batch; switching between experts is an index swap.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from doe.expert import TaskExpert
from doe.prompt import TaskModel, eval_mode
from doe.router import TaskRouter
from doe.tasks import Example, TaskSpec, get_task
from doe.unplug import check_expert, current_expert, model_lock, restore_, unplug_

__all__ = ["Request", "Result", "UnplugAndPlay"]

DENSE = "dense"


@dataclass
class Request:
    text: str
    text_pair: Optional[str] = None
    task: Optional[str] = None
    id: Any = None

    @classmethod
    def coerce(cls, item: Union["Request", dict, str], position: int) -> "Request":
        if isinstance(item, Request):
            req = item
        elif isinstance(item, str):
            req = cls(text=item)
        elif isinstance(item, dict):
            unknown = set(item) - {"text", "text_pair", "task", "id"}
            if unknown:
                raise ValueError(f"request {position}: unknown fields {sorted(unknown)}; expected text, "
                                 "text_pair, task, id")
            if "text" not in item:
                raise ValueError(f"request {position}: missing 'text' (got fields {sorted(item)})")
            req = cls(**item)
        else:
            raise TypeError(f"request {position}: expected a Request, dict or str, got {type(item).__name__}")
        if not isinstance(req.text, str):
            raise TypeError(f"request {position}: 'text' must be a string, got {type(req.text).__name__}")
        if req.id is None:
            req.id = position
        return req


@dataclass
class Result:
    id: Any
    task: Optional[str]  # the task that served the request
    expert: str  # the expert's task, or "dense"
    label: Optional[str] = None
    label_id: Optional[int] = None
    probability: Optional[float] = None
    routed: bool = False  # the task was identified from the text
    route_confidence: Optional[float] = None
    latency_ms: float = 0.0  # switch + inference of this request's batch
    switch_ms: float = 0.0
    batch_size: int = 0
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Entry:
    spec: TaskSpec
    expert: Optional[TaskExpert]
    on_expert: Optional[TaskModel]  # prompt/head tuned for the expert
    on_dense: TaskModel  # prompt/head for the dense model


class UnplugAndPlay:
    """Serve many tasks from one model by swapping task experts in and out.

    threshold: the router's confidence below which a request runs on the dense model (with the
    routed task's dense prompt and head). max_batch: consecutive same-task requests per batch.
    restore_when_idle: put the original model back when ``process`` returns.
    """

    def __init__(self, model: nn.Module, tokenizer, *, router: Optional[TaskRouter] = None,
                 threshold: float = 0.5, max_batch: int = 32, max_length: int = 64,
                 restore_when_idle: bool = True):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a confidence in [0, 1], got {threshold}")
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.threshold, self.max_batch, self.max_length = threshold, max_batch, max_length
        self.restore_when_idle = restore_when_idle
        self._entries: dict[str, _Entry] = {}
        self.records: list[Result] = []
        self.switches: list[float] = []

    # ------------------------------------------------------------------ registry

    @property
    def tasks(self) -> list[str]:
        return list(self._entries)

    def add_expert(self, expert: Union[TaskExpert, str, Path], spec: Optional[TaskSpec] = None) -> TaskExpert:
        """Register a task expert (a TaskExpert or an expert folder). Validated against the model
        now; its index lists are staged on the model's device once."""
        if not isinstance(expert, TaskExpert):
            expert = TaskExpert.from_pretrained(expert)
        spec = spec or get_task(expert.task or "")
        check_expert(self.model, expert)
        if expert.prompt is None and expert.dense_prompt is None:
            raise ValueError(f"expert for {spec.name!r} carries no prompt: localize it with doe.find_expert "
                             "(or `doe localize`) so it can classify")
        dense_prompt = expert.dense_prompt if expert.dense_prompt is not None else expert.prompt
        dense_head = expert.dense_head if expert.dense_head is not None else expert.head
        on_dense = self._task_model(spec, dense_prompt, dense_head)
        on_expert = self._task_model(spec, expert.prompt if expert.prompt is not None else dense_prompt,
                                     expert.head if expert.head is not None else dense_head)
        expert.stage(next(self.model.parameters()).device)
        self._entries[spec.name] = _Entry(spec, expert, on_expert, on_dense)
        return expert

    def add_task(self, spec: Union[TaskSpec, str], prompt: torch.Tensor,
                 head: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Register a task that always runs on the dense model."""
        spec = get_task(spec)
        self._entries[spec.name] = _Entry(spec, None, None, self._task_model(spec, prompt, head))

    def _task_model(self, spec: TaskSpec, prompt, head) -> TaskModel:
        return TaskModel(self.model, self.tokenizer, spec, prompt=prompt, head=head, max_length=self.max_length)

    # ------------------------------------------------------------------ serving

    def _identify(self, requests: list[Request]) -> list[tuple[Optional[str], bool, Optional[float], Optional[str]]]:
        """Per request: (task, routed, confidence, error)."""
        out: list = [None] * len(requests)
        unnamed = [i for i, r in enumerate(requests) if r.task is None]
        for i, r in enumerate(requests):
            if r.task is not None:
                err = None if r.task in self._entries else (
                    f"unknown task {r.task!r}; this runtime serves {self.tasks}")
                out[i] = (r.task if err is None else None, False, None, err)
        if unnamed:
            if self.router is None:
                for i in unnamed:
                    out[i] = (None, True, None, "request has no 'task' and the runtime has no router")
            else:
                tasks, confs = self.router.route(self.model_for_routing(), self.tokenizer,
                                                 [requests[i].text for i in unnamed])
                for i, task, conf in zip(unnamed, tasks, confs):
                    err = None if task in self._entries else f"router chose {task!r}, which has no registered task"
                    out[i] = (task if err is None else None, True, conf, err)
        return out

    def model_for_routing(self) -> nn.Module:
        """Routing reads dense representations: restore first if an expert is installed."""
        if current_expert(self.model) is not None:
            restore_(self.model)
        return self.model

    def _switch(self, entry: Optional[_Entry], use_expert: bool) -> float:
        """Install the right FFN state; returns milliseconds spent."""
        device = next(self.model.parameters()).device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        installed = current_expert(self.model)
        target = entry.expert if use_expert and entry is not None else None
        if installed is target:
            return 0.0
        sync()
        t0 = time.perf_counter()
        if target is not None:
            unplug_(self.model, target)
        else:
            restore_(self.model)
        sync()
        ms = 1000 * (time.perf_counter() - t0)
        self.switches.append(ms)
        return ms

    def _run_group(self, entry: _Entry, use_expert: bool, group: list[tuple[int, Request]],
                   meta: list) -> list[tuple[int, Result]]:
        task_model = entry.on_expert if use_expert else entry.on_dense
        name = entry.spec.name if use_expert else DENSE
        results = []
        with model_lock(self.model):
            try:
                switch_ms = self._switch(entry, use_expert)
                t0 = time.perf_counter()
                examples = [Example(r.text, 0, r.text_pair) for _, r in group]
                with torch.inference_mode(), eval_mode(task_model):
                    probs = torch.softmax(task_model(**task_model.encode(examples)).float(), -1)
                if probs.is_cuda:
                    torch.cuda.synchronize(probs.device)
                ms = switch_ms + 1000 * (time.perf_counter() - t0)
                p, idx = probs.max(-1)
                for (i, r), pi, li in zip(group, p.tolist(), idx.tolist()):
                    _, routed, conf, _ = meta[i]
                    results.append((i, Result(r.id, entry.spec.name, name, entry.spec.labels[li], li, pi, routed,
                                              conf, ms, switch_ms, len(group))))
            except Exception as exc:  # the request fails, the runtime stays usable
                for i, r in group:
                    _, routed, conf, _ = meta[i]
                    results.append((i, Result(r.id, entry.spec.name, name, routed=routed, route_confidence=conf,
                                              batch_size=len(group), error=f"{type(exc).__name__}: {exc}")))
        return results

    def process(self, requests: Iterable[Union[Request, dict, str]]) -> list[Result]:
        """Serve a stream of requests in order; returns one Result per request, same order."""
        reqs = [Request.coerce(r, i) for i, r in enumerate(requests)]
        with model_lock(self.model):
            meta = self._identify(reqs)
            out: list[Optional[Result]] = [None] * len(reqs)
            group: list[tuple[int, Request]] = []
            key = None

            def flush():
                if group:
                    entry = self._entries[key[0]]
                    for i, res in self._run_group(entry, key[1], group, meta):
                        out[i] = res
                    group.clear()

            for i, r in enumerate(reqs):
                task, routed, conf, err = meta[i]
                if err is not None:
                    out[i] = Result(r.id, None, DENSE, routed=routed, route_confidence=conf, error=err)
                    continue
                entry = self._entries[task]
                use_expert = entry.expert is not None and (not routed or conf >= self.threshold)
                k = (task, use_expert)
                if k != key or len(group) >= self.max_batch:
                    flush()
                    key = k
                group.append((i, r))
            flush()
            if self.restore_when_idle:
                self._switch(None, False)
        self.records += out
        return out

    __call__ = process

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict:
        """Counts, latencies and switch times of every request served so far."""
        done = [r for r in self.records if r.error is None]
        by_expert: dict[str, list[float]] = {}
        for r in done:
            by_expert.setdefault(r.expert, []).append(r.latency_ms / max(r.batch_size, 1))
        return {
            "requests": len(self.records),
            "errors": sum(r.error is not None for r in self.records),
            "routed": sum(r.routed for r in self.records),
            "switches": len(self.switches),
            "switch_ms_median": statistics.median(self.switches) if self.switches else 0.0,
            "switch_ms_max": max(self.switches) if self.switches else 0.0,
            "ms_per_request": {k: statistics.median(v) for k, v in sorted(by_expert.items())},
        }
