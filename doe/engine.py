"""Continuous batching for decoder LMs: many generations share one decode batch, each row on its
own task expert (``doe.mixed_batch``) or the dense model, with its own soft prompt and sampling.

    engine = GenerationEngine(runtime, max_batch=16)
    engine.start()                                     # a worker thread steps the batch
    h = engine.submit(GenerateParams("Hi", max_new_tokens=32), task="summarize", on_text=print)
    g = h.result()                                     # a doe.generation.Generation

Iteration-level scheduling: every step first admits queued requests (oldest first, while the
batch has room: ``max_batch`` rows, ``kv_budget`` cache slots, ``prefill_budget`` prompt tokens
this step), prefills each alone and samples its first token, then runs one decode forward over
every row and retires the rows that finished. A request that does not fit waits at the head of
the queue and nothing overtakes it, so no task starves. Rows are left-padded to the longest
row's cache; each row's positions are its own. While every row runs on one expert (or dense),
that expert is installed by itself; rows of several experts run with all of them resident
(each row with its own expert's bias compensation).

transformers' continuous batching (``generate_batch``) is not used: it takes token ids only,
while DoE rows start with a soft prompt given as embeddings, and its scheduler packs the tokens
of all requests into one ragged row whose owner per token is decided inside the engine at every
step, where ``mixed_batch`` needs each row's expert before the forward.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from doe.backbone import generation_inputs
from doe.generation import GenerateParams, Generation, choose_tokens, sendable
from doe.locking import model_lock
from doe.unplug import mixed_batch
from doe.worker import Worker

log = logging.getLogger(__name__)

__all__ = ["GenerationEngine", "GenerationHandle", "EngineFull", "EngineStopped", "generate_all"]


class EngineFull(Exception):
    """The queue is full: try again later."""


class EngineStopped(Exception):
    """The engine no longer takes requests."""


@dataclass(eq=False)
class GenerationHandle:
    """One request in the engine: its progress, its timings and, once ``done``, its result.

    on_text: called from the engine's thread with each new piece of text (held back while it
    could still become a stop string or an incomplete character); on_token: with each new
    token id.
    """

    params: GenerateParams
    task: Optional[str]
    use_expert: bool
    prompt_ids: Optional[list[int]]  # None until admitted (laid out by the engine's thread)
    on_text: Optional[Callable[[str], None]] = None
    on_token: Optional[Callable[[int], None]] = None
    should_stop: Optional[Callable[[], bool]] = None  # polled every step; True ends it ("cancelled")
    on_done: Optional[Callable[["GenerationHandle"], None]] = None  # called once, when done
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length" or "cancelled"
    error: Optional[str] = None
    submitted: float = field(default_factory=time.perf_counter)
    started: Optional[float] = None  # admitted into the batch
    first_token: Optional[float] = None
    finished: Optional[float] = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    _sent: int = 0  # characters of text passed to on_text
    _sent_text: str = ""
    _full: str = ""  # the decoded tokens, before any stop string cut
    _soft: Optional[torch.Tensor] = None  # (P, hidden) the task's soft prompt
    _layout: Optional[Callable[[str], list[int]]] = None  # the task's prompt layout, else the tokenizer

    @property
    def expert(self) -> Optional[str]:
        """The expert's task that runs this row (None: the dense model)."""
        return self.task if self.use_expert else None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens (its soft prompt not included); 0 before admission."""
        return len(self.prompt_ids or ())

    @property
    def prefill(self) -> int:
        """Positions of the prefill: soft prompt and prompt tokens."""
        return (0 if self._soft is None else int(self._soft.shape[0])) + self.prompt_tokens

    @property
    def reserved(self) -> int:
        """Cache slots this row may reach: its prefill and every new token."""
        return self.prefill + self.params.max_new_tokens

    def cancel(self) -> None:
        """Stop at the next step (``finish_reason`` "cancelled")."""
        self.cancelled = True

    def result(self, timeout: Optional[float] = None) -> Generation:
        """Wait for the end; raises RuntimeError if the request failed, TimeoutError on timeout."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"generation not finished after {timeout} s")
        if self.error is not None:
            raise RuntimeError(self.error)
        return Generation(list(self.token_ids), self.text, self.prompt_tokens, self.finish_reason,
                          1000 * (self.finished - self.submitted))


class _Row:
    """A live row: its handle, soft prompt, cache length and the token to feed next."""

    def __init__(self, handle: GenerationHandle, soft: Optional[torch.Tensor], generator: Optional[torch.Generator]):
        self.handle, self.soft, self.generator = handle, soft, generator
        self.length = 0
        self.pending: Optional[int] = None


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (B, kv_heads, L, head_dim), of a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _out_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim)


class GenerationEngine(Worker):
    """Continuous batching over a ``doe.UnplugAndPlay`` runtime's decoder model and tasks.

    max_batch: rows decoded together. kv_budget: the most cache slots the batch may come to
    (rows x the longest row's prompt plus new tokens; None: no limit). prefill_budget: prompt
    tokens prefilled per step (a longer prompt alone). max_queue: requests waiting; more raise
    EngineFull. on_step: called after every decode step with (rows, cache slots in use).
    restore_when_idle: the worker thread puts the dense model back whenever it runs out of work.
    """

    thread_name = "doe-generation"

    def __init__(self, runtime, *, max_batch: int = 16, kv_budget: Optional[int] = None,
                 prefill_budget: int = 1024, max_queue: int = 256,
                 on_step: Optional[Callable[[int, int], None]] = None, restore_when_idle: bool = False):
        if runtime.kind != "decoder":
            raise ValueError(f"generate needs a decoder LM; this runtime's model is {runtime.kind} "
                             f"({getattr(runtime.model.config, 'model_type', '?')})")
        if runtime.compact:
            raise ValueError("GenerationEngine batches rows of every expert on the original weights; a compact "
                             "runtime runs one expert at a time: use UnplugAndPlay(..., compact=False)")
        for name, value in (("max_batch", max_batch), ("prefill_budget", prefill_budget), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationEngine.{name}: expected a positive int, got {value!r}")
        if kv_budget is not None and (isinstance(kv_budget, bool) or not isinstance(kv_budget, int) or kv_budget < 1):
            raise ValueError(f"GenerationEngine.kv_budget: expected None or a positive int, got {kv_budget!r}")
        self.runtime, self.model, self.tokenizer = runtime, runtime.model, runtime.tokenizer
        self.max_batch, self.kv_budget, self.prefill_budget, self.max_queue = (max_batch, kv_budget, prefill_budget,
                                                                               max_queue)
        self.on_step, self.restore_when_idle = on_step, restore_when_idle
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if "position_ids" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(f"GenerationEngine needs a model whose forward takes position_ids (rows are left-padded "
                             f"to different lengths); {type(self.model).__name__} does not")
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # transformers renamed the cache argument and output from past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._queue: deque[GenerationHandle] = deque()
        self._admitting: list[GenerationHandle] = []
        self._mixed = False  # every expert resident (mixed_batch), else one expert or dense installed
        self._rows: list[_Row] = []
        self._past = None  # the batch's transformers cache, left-padded to the longest row
        self._mask: Optional[torch.Tensor] = None  # (B, L) 1 where a row has a cache entry
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0

    # ------------------------------------------------------------------ requests

    def submit(self, params: GenerateParams, *, task: Optional[str] = None, use_expert: Optional[bool] = None,
               prompt_ids: Optional[Sequence[int]] = None,
               on_text: Optional[Callable[[str], None]] = None, on_token: Optional[Callable[[int], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None,
               on_done: Optional[Callable[[GenerationHandle], None]] = None) -> GenerationHandle:
        """Queue one generation: on ``task``'s expert after its soft prompt (a generation task's
        prompt laid out as tuned), or dense (task None, or ``use_expert=False``: the task's
        dense prompt). prompt_ids: the prompt's tokens as given (default: ``params.prompt``
        laid out by the task, or tokenized as is, on the engine's thread when admitted). Raises
        ValueError for an unknown task, EngineFull when the queue is full, EngineStopped once
        stopping; a prompt longer than the model's positions fails the handle when admitted."""
        entry = None
        if task is not None:
            entry = self.runtime._entries.get(task)
            if entry is None:
                raise ValueError(f"unknown task {task!r}; this runtime serves {self.runtime.tasks}")
        expert = entry is not None and entry.expert is not None and use_expert is not False
        tm = None if entry is None else entry.on_expert if expert else entry.on_dense
        ids = None if prompt_ids is None else [int(t) for t in prompt_ids]
        if ids is not None and not ids and tm is None:
            raise ValueError("the prompt has no tokens and no task prompt comes before it")
        layout = tm.prompt_ids if tm is not None and entry.spec.is_generation else None
        handle = GenerationHandle(params, task, expert, ids, on_text, on_token, should_stop, on_done,
                                  _soft=None if tm is None else tm.prompt.detach(), _layout=layout)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is stopping")
            if self._thread is not None and not self._thread.is_alive():
                raise EngineStopped("the generation worker stopped")
            if len(self._queue) >= self.max_queue:
                raise EngineFull(f"the queue holds {len(self._queue)} of {self.max_queue} requests")
            self._queue.append(handle)
            self._cond.notify_all()
        return handle

    def busy(self, task: str) -> int:
        """Requests of ``task`` queued or running."""
        with self._cond:
            return (sum(h.task == task for h in self._queue) + sum(h.task == task for h in self._admitting)
                    + sum(r.handle.task == task for r in self._rows))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def kv_used(self) -> int:
        """Cache slots held now (rows x the longest row's cache)."""
        return 0 if self._mask is None else int(self._mask.numel())

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = not self._queue and not self._rows
                if idle and self._stopping:
                    return
            if idle:
                if self.restore_when_idle:  # outside the condition: step() takes the model's lock first
                    try:
                        self.runtime.switch(None)
                    except Exception:  # the next step installs what it needs; the worker goes on
                        log.exception("generation worker: restoring the dense model failed")
                with self._cond:
                    while not self._queue and not self._rows and not self._stopping:
                        self._cond.wait()
                continue
            self.step()

    def run(self, handles: Sequence[GenerationHandle]) -> Sequence[GenerationHandle]:
        """Step in this thread until ``handles`` are done (an engine without a worker); with the
        runtime's ``restore_when_idle``, the model is left as it was found."""
        if self.alive:
            raise RuntimeError("GenerationEngine.run: a worker thread steps this engine; wait on the handles")
        with self.runtime._left_as_found():
            while not all(h.done.is_set() for h in handles):
                self.step()
        return handles

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        """Admit what fits, decode one token for every row, retire the finished rows."""
        with model_lock(self.model), torch.inference_mode():
            admitted: list[GenerationHandle] = []
            try:
                admitted = self._admit()
                if self._rows or admitted:
                    self._install({r.handle.expert for r in self._rows} | {h.expert for h in admitted})
                for handle in admitted:
                    self._prefill(handle)
                if self._rows:
                    self._decode()
            except Exception as exc:  # the rows fail, the engine stays usable
                error = f"{type(exc).__name__}: {exc}"
                for h in admitted:
                    self._finish(h, None, error=error)
                self._fail_all(error)
            finally:
                with self._cond:
                    self._admitting = []
        self.steps += 1

    def _admit(self) -> list[GenerationHandle]:
        out = self._admitting = []  # counted by busy() until they are rows
        with self._cond:
            for h in [h for h in self._queue if h.cancelled]:
                self._queue.remove(h)
                self._finish(h, "cancelled")
            tokens = 0
            longest = max((r.handle.reserved for r in self._rows), default=0)
            while self._queue and len(self._rows) + len(out) < self.max_batch:
                head = self._queue[0]
                if head.cancelled:
                    self._finish(self._queue.popleft(), "cancelled")
                    continue
                if not self._prepare(head):
                    self._queue.popleft()
                    continue
                fits_kv = (self.kv_budget is None or not (self._rows or out)
                           or (len(self._rows) + len(out) + 1) * max(longest, head.reserved) <= self.kv_budget)
                if not fits_kv or (out and tokens + head.prefill > self.prefill_budget):
                    break
                out.append(self._queue.popleft())
                tokens += head.prefill
                longest = max(longest, head.reserved)
        return out

    def _prepare(self, h: GenerationHandle) -> bool:
        """Lay out the prompt's tokens (under the model's lock: the tokenizer is shared); False
        (and the handle failed) when there are none or they do not fit the model."""
        if h.prompt_ids is None:
            try:
                h.prompt_ids = (h._layout(h.params.prompt) if h._layout is not None
                                else self.tokenizer(h.params.prompt)["input_ids"])
            except Exception as exc:
                return self._finish(h, None, error=f"{type(exc).__name__}: {exc}") and False
        if not h.prefill:
            return self._finish(h, None, error="the prompt has no tokens") and False
        if self.max_positions is not None and h.reserved > self.max_positions:
            return self._finish(h, None, error=f"context_length_exceeded: {h.prefill} prompt positions + "
                                f"{h.params.max_new_tokens} new tokens = {h.reserved}, but the model has "
                                f"{self.max_positions}") and False
        return True

    def _install(self, experts: set) -> None:
        """One expert's rows (or dense rows) alone run on that expert installed by itself (bias
        compensation included); rows of several run with every expert resident (mixed_batch)."""
        rt = self.runtime
        if len(experts) == 1:
            (task,) = experts
            target = None if task is None else rt._entries[task].expert
        else:
            target = rt._resident()
        rt._switch(target)
        self._mixed = isinstance(target, dict)

    def _tasks(self, rows: Sequence[_Row]):
        if not self._mixed:
            return contextlib.nullcontext()
        return mixed_batch(self.model, [r.handle.expert for r in rows])

    def _prefill(self, handle: GenerationHandle) -> None:
        handle.started = time.perf_counter()
        params = handle.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self._device())
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        row = _Row(handle, handle._soft, generator)
        try:
            ids = torch.tensor([handle.prompt_ids], dtype=torch.long, device=self._device())
            inputs = generation_inputs(self.model, ids, row.soft)
            extra = {"logits_to_keep": 1} if self._keep else {}
            with self._tasks([row]):
                out = self.model(**inputs, use_cache=True, **extra)
        except Exception as exc:
            self._finish(handle, None, error=f"{type(exc).__name__}: {exc}")
            return
        row.length = int(inputs["attention_mask"].shape[1])
        token = choose_tokens(out.logits[:, -1], [handle.params], [row.generator])[0]
        if self._emit(row, token):
            return
        mask = torch.ones(1, row.length, dtype=torch.long, device=self._device())
        if self._past is None:
            self._past, self._mask = _out_cache(out), mask
        else:
            have, new = self._mask.shape[1], row.length
            width = max(have, new)
            self._past = _cache([(torch.cat([_left_pad(k, width - have, 2), _left_pad(nk, width - new, 2)]),
                                  torch.cat([_left_pad(v, width - have, 2), _left_pad(nv, width - new, 2)]))
                                 for (k, v), (nk, nv) in zip(_layers(self._past), _layers(_out_cache(out)))])
            self._mask = torch.cat([_left_pad(self._mask, width - have, 1), _left_pad(mask, width - new, 1)])
        self._rows.append(row)

    def _decode(self) -> None:
        rows = self._rows
        device = self._device()
        ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], 1)
        inputs = {"input_ids": ids, "attention_mask": mask, self._cache_arg: self._past, "use_cache": True}
        inputs["position_ids"] = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=device)
        with self._tasks(rows):
            out = self.model(**inputs)
        self._past, self._mask = _out_cache(out), mask
        for r in rows:
            r.length += 1
        tokens = choose_tokens(out.logits[:, -1], [r.handle.params for r in rows], [r.generator for r in rows])
        keep = [i for i, (r, t) in enumerate(zip(rows, tokens)) if not self._emit(r, t)]
        if self.on_step is not None:
            self.on_step(len(rows), self.kv_used)
        if len(keep) < len(rows):
            self._retire(keep)

    def _retire(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._past = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self._mask = mask[:, start:]
        self._past = _cache([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                             for k, v in _layers(self._past)])

    def _fail_all(self, error: str) -> None:
        for r in self._rows:  # rows that finished earlier in the step keep their result (_finish)
            self._finish(r.handle, None, error=error)
        self._rows, self._past, self._mask = [], None, None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokens

    def _emit(self, row: _Row, token: int) -> bool:
        """Record ``token`` for ``row``; True when the row is finished."""
        h = row.handle
        now = time.perf_counter()
        if h.first_token is None:
            h.first_token = now
        h.token_ids.append(token)
        if h.on_token is not None:
            h.on_token(token)
        if token in self.eos:
            h.text = self.tokenizer.decode(h.token_ids, skip_special_tokens=True)
            return self._finish(h, "stop")
        h._full = self.tokenizer.decode(h.token_ids, skip_special_tokens=True)
        stops = h.params.stop
        if stops:
            start = max(0, h._sent - max(len(s) for s in stops))
            hits = [i for i in (h._full.find(s, start) for s in stops) if i >= 0]
            if hits:
                h.text = h._full[: min(hits)]
                return self._finish(h, "stop")
        if len(h.token_ids) >= h.params.max_new_tokens:
            h.text = h._full
            return self._finish(h, "length")
        if h.cancelled or (h.should_stop is not None and h.should_stop()):
            h.text = h._full
            return self._finish(h, "cancelled")
        self._send(h, sendable(h._full, h._sent, h.params.stop))
        row.pending = token
        return False

    def _send(self, h: GenerationHandle, end: int) -> None:
        if end > h._sent and h._full.startswith(h._sent_text):  # decoding more tokens may rewrite earlier text
            piece = h._full[h._sent: end]
            h._sent, h._sent_text = end, h._full[:end]
            if h.on_text is not None:
                h.on_text(piece)

    def _finish(self, h: GenerationHandle, reason: Optional[str], error: Optional[str] = None) -> bool:
        if h.done.is_set():
            return True
        h.finish_reason, h.error = reason, error
        if error is None:
            h._full = h.text
            self._send(h, len(h.text))
        h.finished = time.perf_counter()
        h.done.set()
        if h.on_done is not None:
            h.on_done(h)
        return True


def generate_all(runtime, requests: Sequence[tuple[GenerateParams, Optional[str]]], *, max_batch: int = 16,
                 on_text: Optional[Callable[[int, str], None]] = None) -> list[Generation]:
    """Run (params, task) pairs through a fresh engine in this thread, continuously batched; one
    Generation per pair, in order. on_text: called with (pair index, new text)."""
    engine = GenerationEngine(runtime, max_batch=max_batch, max_queue=max(1, len(requests)))
    handles = [engine.submit(p, task=t, on_text=None if on_text is None else (lambda s, i=i: on_text(i, s)))
               for i, (p, t) in enumerate(requests)]
    return [h.result() for h in engine.run(handles)]
