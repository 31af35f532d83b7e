"""The unplug-and-play runtime: one model, many task experts, the paper's four steps per request.

    rt = doe.UnplugAndPlay(model, tokenizer, router=router)
    rt.add_expert("experts/offline_sentiment")        # index lists + prompts resident, no weights
    results = rt.process([{"text": "Loved it."}, {"text": "Is it raining?", "task": "offline_question"}])

For each request: (1) receive it, (2) identify the task's expert (by name, else by the router;
below ``threshold`` the dense model serves it), (3) run it on the expert-localized model,
(4) restore the original model when the stream moves to a task with no expert or goes idle.
Consecutive requests for one task run as one batch; switching between experts is an index swap.

Mixed mode (``mixed=True``): every registered expert stays resident (``doe.unplug_`` with the
mapping of all of them) and requests of any task, named or routed, batch together up to
``max_batch`` requests and ``token_budget`` padded tokens; each batch is one forward
(``doe.mixed_batch``), every row on its own expert with its own prompt and head, rows below the
router's threshold on the dense model. Results are those of the one-task-at-a-time mode.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from doe.expert import TaskExpert, model_fingerprint
from doe.generation import GenerateParams, Generation
from doe.locking import model_lock
from doe.models import eval_mode, model_kind
from doe.mixed import mixed_classify
from doe.prompt import TaskModel
from doe.requests import Counts, Recent, Request, Result, text_tokens
from doe.router import TaskRouter
from doe.tasks import Example, TaskSpec, get_task
from doe.unplug import (
    Experts,
    Installed,
    check_expert,
    compact_memory,
    installed,
    is_unplugged,
    mixed_batch,
    restore_,
    unplug_,
)
from doe_kernels.env import synchronize

__all__ = ["UnplugAndPlay", "check_experts"]

DENSE = "dense"


class _Identity(NamedTuple):
    """How one request was matched to a task."""

    task: Optional[str]
    routed: bool
    confidence: Optional[float]
    error: Optional[str]


@dataclass
class _Entry:
    spec: TaskSpec
    expert: Optional[TaskExpert]
    on_expert: Optional[TaskModel]  # prompt/head tuned for the expert
    on_dense: TaskModel  # prompt/head for the dense model


class _Row(NamedTuple):
    """A request ready to run: where it goes in the output, its task's entry, and whether the
    expert (else the dense model) serves it."""

    index: int
    request: Request
    entry: _Entry
    use_expert: bool

    @property
    def task_model(self) -> TaskModel:
        return self.entry.on_expert if self.use_expert else self.entry.on_dense

    @property
    def expert_task(self) -> Optional[str]:
        """The expert's task (its name in ``mixed_batch``), None for the dense model."""
        return self.entry.spec.name if self.use_expert else None


def check_experts(experts: Sequence[TaskExpert], router: Optional[TaskRouter] = None) -> None:
    """Raise ValueError unless there is one expert per task, each with a prompt, and the router
    routes only to their tasks. Needs no model: run it before loading one."""
    tasks = [e.task for e in experts]
    if not experts or not all(tasks):
        raise ValueError(f"expected at least one expert, each naming its task, got tasks {tasks or 'none'}")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise ValueError(f"expected one expert per task, got several for {twice}")
    bare = [e.task for e in experts if e.prompt is None and e.dense_prompt is None]
    if bare:
        raise ValueError(f"the experts of {bare} carry no prompt: localize them with `doe localize`")
    if router is not None and set(router.tasks) - set(tasks):
        raise ValueError(f"the router routes to tasks {sorted(set(router.tasks) - set(tasks))} that no expert "
                         f"serves (experts serve {sorted(tasks)})")


class UnplugAndPlay:
    """Serve many tasks from one model by swapping task experts in and out.

    threshold: the router's confidence below which a request runs on the dense model (with the
    routed task's dense prompt and head). max_batch: consecutive same-task requests per batch.
    restore_when_idle: put the original model back when ``process`` returns.
    mixed: batch requests of different tasks together, one forward per batch (see the module
    docstring); token_budget: in mixed mode, the padded tokens (rows x the longest row, prompt
    included) a batch may hold (None: no limit; ``max_tokens``, its earlier name, is accepted
    with a DeprecationWarning). max_length: tokens per text (longer texts are truncated).
    compact: run experts on compacted copies of their kept weights, made once per expert and
    kept while it is resident (memory for speed, reported by ``summary()``; see
    ``doe.unplug_``). Off by default: experts then cost only their index lists.
    history: how many recent results and switch times ``records`` and ``switches`` keep (a
    long-lived process must not grow); ``summary()`` counts every request and switch since
    ``reset_log``, its medians cover the recent ones.
    on_switch: called with the milliseconds of every switch (a metrics exporter).
    """

    def __init__(self, model: nn.Module, tokenizer, *, router: Optional[TaskRouter] = None,
                 threshold: float = 0.5, max_batch: int = 32, max_length: int = 64,
                 restore_when_idle: bool = True, compact: bool = False, mixed: bool = False,
                 token_budget: Optional[int] = None, history: int = 10_000,
                 on_switch: Optional[Callable[[float], None]] = None, max_tokens: Optional[int] = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a confidence in [0, 1], got {threshold}")
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        if mixed and compact:
            raise ValueError("compact=True runs one expert at a time; mixed=True runs every expert on the original "
                             "weights at once: choose one")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history: expected an int >= 1, got {history!r}")
        budget_name = "token_budget"
        if max_tokens is not None:
            if token_budget is not None:
                raise ValueError(f"max_tokens is the earlier name of token_budget: give one, got token_budget="
                                 f"{token_budget} and max_tokens={max_tokens}")
            warnings.warn("UnplugAndPlay(max_tokens=...) is now token_budget; the old name goes in the next release",
                          DeprecationWarning, stacklevel=2)
            token_budget, budget_name = max_tokens, "max_tokens"
        if token_budget is not None and (not mixed or token_budget < 1):
            raise ValueError(f"{budget_name}: expected None or >= 1 with mixed=True, got {token_budget} "
                             f"(mixed={mixed})")
        self.mixed, self.token_budget = mixed, token_budget
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.threshold, self.max_batch, self.max_length = threshold, max_batch, max_length
        self.restore_when_idle = restore_when_idle
        self.compact = compact
        self._entries: dict[str, _Entry] = {}
        self.on_switch = on_switch
        self._log_lock = threading.Lock()  # the log is written by the serving thread, read by others
        self.records: deque[Result] = Recent(maxlen=history)
        self.switches: deque[float] = Recent(maxlen=history)
        self._counts = Counts()

    # ------------------------------------------------------------------ registry

    @property
    def tasks(self) -> list[str]:
        return list(self._entries)

    def add_expert(self, expert: Union[TaskExpert, str, Path], spec: Optional[TaskSpec] = None) -> TaskExpert:
        """Register a task expert (a TaskExpert or an expert folder). Validated against the model
        now; its index lists are staged on the model's device once. Safe while other threads
        are serving."""
        if not isinstance(expert, TaskExpert):
            expert = TaskExpert.from_pretrained(expert)
        spec = spec or expert.spec()
        if expert.prompt is None and expert.dense_prompt is None:
            raise ValueError(f"expert for {spec.name!r} carries no prompt: localize it with doe.find_expert "
                             "(or `doe localize`) so it can classify")
        with model_lock(self.model):
            check_expert(self.model, expert)
            on_dense = self._task_model(spec, *expert.prompt_and_head(on_expert=False))
            on_expert = self._task_model(spec, *expert.prompt_and_head(on_expert=True))
            expert.stage(self._device())
            self._entries[spec.name] = _Entry(spec, expert, on_expert, on_dense)
        return expert

    def remove_expert(self, task: str) -> None:
        """Unregister ``task``; the dense model is put back first if any expert is installed.
        Waits for the model's lock, so a forward in flight finishes first."""
        with model_lock(self.model):
            if task not in self._entries:
                raise ValueError(f"unknown task {task!r}; this runtime serves {self.tasks}")
            if is_unplugged(self.model):
                self._switch(None)
            del self._entries[task]

    def add_task(self, spec: Union[TaskSpec, str], prompt: torch.Tensor,
                 head: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Register a task that always runs on the dense model."""
        spec = get_task(spec)
        with model_lock(self.model):
            self._entries[spec.name] = _Entry(spec, None, None, self._task_model(spec, prompt, head))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _task_model(self, spec: TaskSpec, prompt, head) -> TaskModel:
        return TaskModel(self.model, self.tokenizer, spec, prompt=prompt, head=head, max_length=self.max_length)

    # ------------------------------------------------------------------ the model

    @property
    def kind(self) -> str:
        """The model's kind: "encoder", "decoder" or "seq2seq"."""
        return model_kind(self.model)

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (what experts record and are checked against)."""
        return model_fingerprint(self.model)

    @property
    def compact_weight_bytes(self) -> int:
        """Bytes held by compacted copies of kept weights (``compact=True``; 0 otherwise)."""
        return compact_memory(self.model)

    @property
    def max_tokens(self) -> Optional[int]:
        """The earlier name of ``token_budget`` (kept for one release)."""
        warnings.warn("UnplugAndPlay.max_tokens is now token_budget", DeprecationWarning, stacklevel=2)
        return self.token_budget

    def installed_tasks(self) -> Union[None, str, list[str]]:
        """The task of the expert installed now, the tasks of an installed mapping, or None (dense)."""
        now = installed(self.model)
        if now is None:
            return None
        if now.experts is not None:
            return sorted(now.experts)
        return None if now.expert is None else now.expert.task

    @contextlib.contextmanager
    def _left_as_found(self):
        """Hold the model's lock; with ``restore_when_idle``, put back what was installed on entry."""
        with model_lock(self.model):
            found = installed(self.model)
            try:
                yield
            finally:
                if self.restore_when_idle:
                    self._switch(found)

    # ------------------------------------------------------------------ generation

    def generate(self, params: Union[GenerateParams, str], *, task: Optional[str] = None,
                 on_token: Optional[Callable[[int], None]] = None, should_stop: Callable[[], bool] = lambda: False,
                 on_text: Optional[Callable[[str], None]] = None) -> Generation:
        """Continue ``params.prompt`` (a str: greedy) with a decoder LM: on ``task``'s expert after
        its soft prompt (a generation task's prompt laid out as tuned), or dense (``task`` None).
        on_token / on_text: called with each new token id / piece of text; should_stop: polled
        every step (True: "cancelled"). The continuous-batching engine (``doe.engine``) runs it;
        with ``restore_when_idle`` the model is left as it was found."""
        from doe.engine import GenerationEngine

        engine = GenerationEngine(self, max_batch=1)
        handle = engine.submit(GenerateParams(params) if isinstance(params, str) else params, task=task,
                               on_text=on_text, on_token=on_token, should_stop=should_stop)
        return engine.run([handle])[0].result()

    # ------------------------------------------------------------------ serving

    def _identify(self, requests: list[Request]) -> list[_Identity]:
        """Per request: its task (by name, else routed), or the error that stops it."""
        out: list[Optional[_Identity]] = [None] * len(requests)
        unnamed = [i for i, r in enumerate(requests) if r.task is None]
        for i, r in enumerate(requests):
            if r.task is not None:
                known = r.task in self._entries
                out[i] = _Identity(r.task if known else None, False, None,
                                   None if known else f"unknown task {r.task!r}; this runtime serves {self.tasks}")
        if unnamed:
            if self.router is None:
                for i in unnamed:
                    out[i] = _Identity(None, True, None, "request has no 'task' and the runtime has no router")
            else:
                tasks, confs = self.router.route(self.model_for_routing(), self.tokenizer,
                                                 [requests[i].text for i in unnamed])
                for i, task, conf in zip(unnamed, tasks, confs):
                    known = task in self._entries
                    out[i] = _Identity(task if known else None, True, conf,
                                       None if known else f"router chose {task!r}, which has no registered task")
        return out

    def model_for_routing(self) -> nn.Module:
        """Routing reads dense representations: restore first if an expert is installed."""
        if is_unplugged(self.model):
            restore_(self.model)
        return self.model

    def _resident(self) -> Optional[dict[str, TaskExpert]]:
        """Mixed mode: every registered expert, by task (None when there is none)."""
        experts = {name: e.expert for name, e in self._entries.items() if e.expert is not None}
        return experts or None

    def switch(self, target: Union[Experts, Installed, None]) -> float:
        """Install ``target`` (None: the dense model; a mapping: all its experts, resident) under
        the model's lock, unless it is installed already; returns milliseconds spent, also logged
        in ``switches``."""
        with model_lock(self.model):
            return self._switch(target)

    def _switch(self, target: Union[Experts, Installed, None]) -> float:
        """Install ``target`` (None: the dense model; a mapping: all its experts, resident; an
        ``Installed``: that with its backend); returns milliseconds spent."""
        expert = target.target if isinstance(target, Installed) else target
        backend = target.backend if isinstance(target, Installed) else None
        compact = target.compact if isinstance(target, Installed) else self.compact
        now = installed(self.model)
        if (now is None and expert is None) or (now is not None and now.holds(expert, compact)):
            return 0.0
        device = self._device()
        synchronize(device)
        t0 = time.perf_counter()
        if expert is not None:
            unplug_(self.model, expert, backend=backend, compact=compact)
        else:
            restore_(self.model)
        synchronize(device)
        ms = 1000 * (time.perf_counter() - t0)
        with self._log_lock:
            self.switches.append(ms)
            self._counts.switches += 1
        if self.on_switch is not None:
            self.on_switch(ms)
        return ms

    def _probabilities(self, group: list[_Row]) -> torch.Tensor:
        """(B, L) class probabilities of one forward over ``group`` (mixed mode: L the most labels
        of any row's task, the others 0)."""
        examples = [Example(row.request.text, 0, row.request.text_pair) for row in group]
        task_models = [row.task_model for row in group]
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for tm in dict.fromkeys(task_models):
                stack.enter_context(eval_mode(tm))
            if not self.mixed:
                return torch.softmax(task_models[0](**task_models[0].encode(examples)).float(), -1)
            if self._resident() is not None:
                stack.enter_context(mixed_batch(self.model, [row.expert_task for row in group]))
            rows = mixed_classify(task_models, examples)
            logits = torch.full((len(rows), max(r.numel() for r in rows)), float("-inf"), device=rows[0].device)
            for i, r in enumerate(rows):
                logits[i, : r.numel()] = r
            return torch.softmax(logits, -1)

    def _run_group(self, group: list[_Row], meta: list[_Identity]) -> list[tuple[int, Result]]:
        """One forward over ``group``: the rows of one task on one model (its expert or the dense
        one), or in mixed mode any rows, every expert resident."""
        results = []
        with model_lock(self.model):
            try:
                first = group[0]
                switch_ms = self._switch(self._resident() if self.mixed else
                                         first.entry.expert if first.use_expert else None)
                t0 = time.perf_counter()
                probs = self._probabilities(group)
                synchronize(probs.device)
                ms = switch_ms + 1000 * (time.perf_counter() - t0)
                p, idx = probs.max(-1)
                for row, pi, li in zip(group, p.tolist(), idx.tolist()):
                    results.append((row.index, self._result(row, meta, batch_size=len(group), label_id=li,
                                                            label=row.entry.spec.labels[li], probability=pi,
                                                            latency_ms=ms, switch_ms=switch_ms)))
            except Exception as exc:  # the request fails, the runtime stays usable
                for row in group:
                    results.append((row.index, self._result(row, meta, batch_size=len(group),
                                                            error=f"{type(exc).__name__}: {exc}")))
        return results

    @staticmethod
    def _result(row: _Row, meta: list[_Identity], **fields) -> Result:
        who = meta[row.index]
        return Result(id=row.request.id, task=row.entry.spec.name, expert=row.expert_task or DENSE, routed=who.routed,
                      route_confidence=who.confidence, **fields)

    def process(self, requests: Iterable[Union[Request, dict, str]]) -> list[Result]:
        """Serve a stream of requests in order; returns one Result per request, same order.

        With ``restore_when_idle`` the model is left as it was found: dense, or running the
        expert that was installed when ``process`` was called.
        """
        reqs = [Request.coerce(r, i) for i, r in enumerate(requests)]
        with self._left_as_found():
            out = self._serve(reqs)
        with self._log_lock:
            self.records.extend(out)
            self._counts.add(out)
        return out

    def _serve(self, reqs: list[Request]) -> list[Result]:
        meta = self._identify(reqs)
        out: list[Optional[Result]] = [None] * len(reqs)
        rows = []
        for i, r in enumerate(reqs):
            who = meta[i]
            if who.error is not None:
                out[i] = Result(id=r.id, task=None, expert=DENSE, routed=who.routed,
                                route_confidence=who.confidence, error=who.error)
                continue
            entry = self._entries[who.task]
            use_expert = entry.expert is not None and (not who.routed or who.confidence >= self.threshold)
            rows.append(_Row(i, r, entry, use_expert))
        for group in self._batches([row for row in rows if not row.entry.spec.is_generation]):
            for i, res in self._run_group(group, meta):
                out[i] = res
        generations = [row for row in rows if row.entry.spec.is_generation]
        if generations:
            for i, res in self._run_generations(generations, meta):
                out[i] = res
        return out

    def _run_generations(self, rows: list[_Row], meta: list[_Identity]) -> list[tuple[int, Result]]:
        """Generation rows, continuously batched (``doe.engine``), ``max_batch`` at a time."""
        from doe.engine import GenerationEngine

        engine = GenerationEngine(self, max_batch=self.max_batch, max_queue=len(rows))
        handles = []
        for row in rows:
            r = row.request
            params = GenerateParams(r.text, r.max_new_tokens or GenerateParams.max_new_tokens)
            handles.append(engine.submit(params, task=row.entry.spec.name, use_expert=row.use_expert))
        out = []
        for row, h in zip(rows, engine.run(handles)):
            fields = dict(error=h.error) if h.error else dict(text=h.text, finish_reason=h.finish_reason)
            out.append((row.index, self._result(row, meta, batch_size=min(len(rows), self.max_batch),
                                                latency_ms=1000 * (h.finished - h.submitted), **fields)))
        return out

    def _batches(self, rows: list[_Row]):
        """Consecutive rows, at most ``max_batch`` a batch: one task on one model at a time, or in
        mixed mode any rows up to ``token_budget`` padded tokens (a longer row alone)."""
        group: list[_Row] = []
        longest = 0
        for row in rows:
            size = self._tokens(row) if self.token_budget is not None else 0
            if group and (len(group) >= self.max_batch
                          or (not self.mixed and (row.entry, row.use_expert) != (group[0].entry, group[0].use_expert))
                          or (self.token_budget is not None
                              and (len(group) + 1) * max(longest, size) > self.token_budget)):
                yield group
                group, longest = [], 0
            group.append(row)
            longest = max(longest, size)
        if group:
            yield group

    def _tokens(self, row: _Row) -> int:
        """The row's length in the forward: its prompt and its text tokens."""
        r = row.request
        return row.task_model.prompt.shape[0] + text_tokens(self.tokenizer, r.text, r.text_pair, self.max_length)

    __call__ = process

    # ------------------------------------------------------------------ reporting

    def reset_log(self) -> None:
        """Forget the results and switches served so far (``summary`` starts from zero)."""
        with self._log_lock:
            self.records.clear()
            self.switches.clear()
            self._counts = Counts()

    def summary(self) -> dict:
        """Counts of every request and switch since ``reset_log``; latencies and switch times
        (medians, max) of the last ``history`` of them."""
        with self._log_lock:  # a snapshot: the serving thread may be appending
            records, switches = list(self.records), list(self.switches)
            c = copy.copy(self._counts)
        done = [r for r in records if r.error is None]
        by_expert: dict[str, list[float]] = {}
        for r in done:
            by_expert.setdefault(r.expert, []).append(r.latency_ms / max(r.batch_size, 1))
        return {
            "requests": c.requests,
            "errors": c.errors,
            "routed": c.routed,
            "switches": c.switches,
            "switch_ms_median": statistics.median(switches) if switches else 0.0,
            "switch_ms_max": max(switches) if switches else 0.0,
            "ms_per_request": {k: statistics.median(v) for k, v in sorted(by_expert.items())},
            "compact_weight_bytes": self.compact_weight_bytes,
        }
