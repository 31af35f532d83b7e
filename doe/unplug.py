"""Unplug and restore in place: swap FFN layers for gathered ones and put them back.

    doe.unplug_(model, expert)        # install (or switch: an index swap)
    doe.restore_(model)               # the original modules, exactly
    with doe.unplugged(model, expert):
        model(**batch)

    doe.unplug_(model, {"a": expert_a, "b": expert_b})     # several experts resident
    with doe.mixed_batch(model, ["a", "b", None, "a"]):     # one task (None: dense) per item
        model(**batch)                                      # each item on its own expert

Nothing is copied: the wrappers hold the original layers by reference and share their
parameters, so ``state_dict``, ``named_parameters``, ``save_pretrained`` and
``load_state_dict`` of an unplugged model are those of the original (same keys, same
tensors). Forward hooks on the original FFN modules keep firing; backward and state-dict hooks
on them are refused.

Everything is validated before the model is touched, so a bad expert or argument leaves the
model as it was. Every change records its intent on the model first and each step is
idempotent, so an operation interrupted anywhere (KeyboardInterrupt, an exception) leaves a
model that ``restore_`` gives back exactly, and that the next ``unplug_`` completes.

Memory for speed (opt-in): ``unplug_(model, expert, compact=True)`` multiplies with compacted
copies of each expert's kept FFN weights, made on its first forward and kept while the expert
lives or until ``release_compact(model)`` (``compact_memory(model)``: their bytes); on CPU,
where gathering costs more than it saves, it runs as fast as a sliced copy of the model.

Mixed batches: with a mapping installed, every FFN block holds the index lists of all its
experts plus a dense list (every neuron) in one device buffer, and ``mixed_batch`` assigns the
rows of the forwards inside it; one launch per projection serves all rows (see
``doe_kernels.segments``). Nothing is switched per batch, and a forward outside ``mixed_batch``
is refused (which expert would it run?). A single TaskExpert installs exactly as before.

Threads: these functions take ``model_lock(model)``; ``unplugged`` holds it for its body, so
``with doe.unplugged(model, expert): model(...)`` is thread-safe. Code that calls ``unplug_`` and
runs the model from several threads must hold the lock around both.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from doe.architectures import FFNBlock, FFNSpec, find_ffn_blocks
from doe.expert import TaskExpert, model_fingerprint, model_type_of
from doe.locking import model_lock
from doe.swaps import Swap, build_swaps, check_replaceable, planned_conversions
from doe_kernels import BACKENDS, CompactWeights, GatheredGatedMLP, resolve_backend, to_neuron_major_, to_row_major_
from doe_kernels.segments import BatchGroups, GroupedIndices

__all__ = ["unplug_", "restore_", "unplugged", "is_unplugged", "current_expert", "installed", "Installed",
           "check_expert", "compact_memory", "release_compact", "mixed_batch"]

#: What ``unplug_`` installs: one expert, or task name -> expert (several resident).
Experts = Union[TaskExpert, Mapping[str, TaskExpert]]

_STATE_ATTR = "_doe_unplug_state"
_CONVERTED_ATTR = "_doe_neuron_major"  # weights re-stored neuron-major, kept across restores
_COMPACT_ATTR = "_doe_compact"  # CompactWeights of the compact=True experts, kept across restores
LAYOUTS = ("auto", "neuron_major", "original")


@dataclass
class _State:
    """What is (or is being) installed. Written before the model changes; ``complete`` is
    True only while every swap, layout change and index list matches it."""

    expert: Optional[TaskExpert]  # the expert, or None while a mapping is installed
    blocks: list[FFNBlock]
    swaps: list[Swap]
    wrappers: list[list[nn.Module]]  # per block, the wrappers whose indices it sets
    planned: list[torch.Tensor]  # weights to re-store neuron-major
    fingerprint: str
    backend: str
    layout: str
    compact: Optional[CompactWeights] = None  # the model's store while compact=True
    complete: bool = False
    experts: Optional[dict[str, TaskExpert]] = None  # a mapping install: the resident experts
    grouped: Optional[list[GroupedIndices]] = None  # per block, their lists and a dense one
    batch: Optional[BatchGroups] = None  # the row assignment every wrapper reads
    offsets: Optional[list] = None  # per block, (G, hidden) output offsets of the groups, or None


class _Target(NamedTuple):
    """What to install, validated and staged, before anything changes."""

    expert: Optional[TaskExpert]
    experts: Optional[dict[str, TaskExpert]]
    grouped: Optional[list[GroupedIndices]]
    batch: Optional[BatchGroups]
    offsets: Optional[list] = None  # per block, (G, hidden) or None: the experts' bias compensation

    def lead(self) -> TaskExpert:
        """The expert whose lists the wrappers' own ``indices`` hold."""
        return self.expert if self.expert is not None else next(iter(self.experts.values()))


def _target(model: nn.Module, experts: Experts, blocks: Sequence[FFNBlock], fingerprint: Optional[str],
            device: torch.device) -> _Target:
    """Check ``experts`` against the model and stage their lists on ``device``."""
    if isinstance(experts, TaskExpert):
        check_expert(model, experts, blocks, fingerprint)
        experts.stage(device)
        return _Target(experts, None, None, None)
    if not isinstance(experts, Mapping):
        raise TypeError(f"expert: expected a doe.TaskExpert, got {type(experts).__name__} (several experts: a "
                        "mapping task name -> TaskExpert)")
    if not experts:
        raise ValueError("experts: expected at least one task name -> TaskExpert entry, got an empty mapping")
    mapping = {}
    for name, expert in experts.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"experts: task names must be non-empty strings, got {name!r}")
        if not isinstance(expert, TaskExpert):
            raise TypeError(f"experts[{name!r}]: expected a doe.TaskExpert, got {type(expert).__name__}")
        check_expert(model, expert, blocks, fingerprint)
        mapping[name] = expert
    lists = [e.indices for e in mapping.values()]  # validated host copies
    for e in mapping.values():
        e.stage(device)
    grouped = [GroupedIndices([idx[i] for idx in lists] + [torch.arange(b.num_neurons, dtype=torch.int32)],
                              b.num_neurons, device, validated=True) for i, b in enumerate(blocks)]
    hint = "several experts are resident: run the model inside doe.mixed_batch(model, tasks)"
    offsets = None
    if any(e.offsets is not None for e in mapping.values()):  # one row per group, zeros where none (dense)
        offsets = [torch.stack([torch.zeros(b.hidden_size) if e.offsets is None or e.offsets[i] is None
                                else e.offsets[i].float().cpu() for e in mapping.values()] + [torch.zeros(b.hidden_size)])
                   for i, b in enumerate(blocks)]
    return _Target(None, mapping, grouped, BatchGroups(len(mapping) + 1, hint=hint), offsets)


def _find_state(model: nn.Module) -> tuple[Optional[nn.Module], Optional[_State]]:
    """The module holding an unplug state (``model`` or one of its submodules) and the state."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        return model, state
    for module in model.modules():
        state = module.__dict__.get(_STATE_ATTR)
        if state is not None:
            return module, state
    return None, None


class Installed(NamedTuple):
    """What ``unplug_`` installed: pass it back as
    ``unplug_(model, i.target, backend=i.backend, compact=i.compact)``.

    compact: the compact choice; a mapping of experts runs on the original weights whatever it
    is, and it applies again when a single expert is installed.

    complete is False after an interrupted unplug_ / restore_: the model may be half-swapped
    until the next ``unplug_`` (which completes it) or ``restore_``.
    """

    expert: Optional[TaskExpert]
    backend: str
    layout: str
    complete: bool
    compact: bool = False
    experts: Optional[dict[str, TaskExpert]] = None  # a mapping install (expert is then None)

    @property
    def target(self) -> Experts:
        """What to pass back to ``unplug_``: the expert or the mapping."""
        return self.expert if self.experts is None else self.experts

    def holds(self, want: Optional[Experts], compact: bool) -> bool:
        """True when this install is ``want`` (the same expert objects), complete, with ``compact``."""
        if want is None or not self.complete or self.compact != compact:
            return False
        if isinstance(want, TaskExpert):
            return self.expert is want
        return self.experts is not None and self.experts.keys() == want.keys() and all(
            self.experts[k] is e for k, e in want.items())


def installed(model: nn.Module) -> Optional[Installed]:
    """The expert (or the mapping of experts) installed in ``model`` or a submodule, with its
    backend and layout, else None."""
    state = _find_state(model)[1]
    if state is None:
        return None
    return Installed(state.expert, state.backend, state.layout, state.complete, state.compact is not None,
                     None if state.experts is None else dict(state.experts))


def _compact_store(model: nn.Module) -> CompactWeights:
    return model.__dict__.setdefault(_COMPACT_ATTR, CompactWeights())


def compact_memory(model: nn.Module) -> int:
    """Bytes held by compacted expert weights (``unplug_(..., compact=True)``) of ``model``."""
    return sum(m.__dict__[_COMPACT_ATTR].nbytes for m in model.modules() if _COMPACT_ATTR in m.__dict__)


def release_compact(model: nn.Module) -> int:
    """Free the compacted expert weights of ``model`` (they are made again on the next compact
    forward); returns the bytes freed."""
    with model_lock(model):
        freed = compact_memory(model)
        for m in model.modules():
            store = m.__dict__.get(_COMPACT_ATTR)
            if store is not None:
                store.clear()
        return freed


def is_unplugged(model: nn.Module) -> bool:
    """True when an expert is installed in ``model`` or in one of its submodules."""
    return _find_state(model)[1] is not None


def current_expert(model: nn.Module) -> Optional[TaskExpert]:
    """The expert installed in ``model`` (or one of its submodules), else None (also while a
    mapping of experts is installed: see ``installed``)."""
    state = _find_state(model)[1]
    return state.expert if state is not None else None


def check_expert(model: nn.Module, expert: TaskExpert, blocks: Optional[Sequence[FFNBlock]] = None,
                 fingerprint: Optional[str] = None) -> None:
    """Raise if ``expert`` does not fit ``model`` (type, FFN blocks, neuron counts, fingerprint).

    Works on an unplugged model too (it sees the original modules through the wrappers).
    """
    if not isinstance(expert, TaskExpert):
        raise TypeError(f"expert: expected a doe.TaskExpert, got {type(expert).__name__}")
    expert.verify()
    with model_lock(model):
        state = model.__dict__.get(_STATE_ATTR)
        if blocks is None:
            blocks = state.blocks if state is not None else find_ffn_blocks(model)
        if fingerprint is None:
            fingerprint = state.fingerprint if state is not None else None
        if expert.fingerprint is not None and fingerprint is None:
            fingerprint = model_fingerprint(model, blocks)
    mtype = model_type_of(model)
    if expert.model_type is not None and mtype is not None and expert.model_type != mtype:
        raise ValueError(f"expert was built for a {expert.model_type!r} model, this model is {mtype!r}")
    if expert.num_blocks != len(blocks):
        raise ValueError(f"expert has {expert.num_blocks} FFN blocks, this model has {len(blocks)}")
    for i, (n, block) in enumerate(zip(expert.num_neurons, blocks)):
        if n != block.num_neurons:
            raise ValueError(f"expert block {i} was built for {n} neurons, this model's block "
                             f"{block.name!r} has {block.num_neurons}")
    for i, (o, block) in enumerate(zip(expert.offsets or (), blocks)):
        if o is not None and o.numel() != block.hidden_size:
            raise ValueError(f"expert block {i} carries an output offset of {o.numel()} values, this model's block "
                             f"{block.name!r} outputs {block.hidden_size}")
    if expert.fingerprint is not None and fingerprint != expert.fingerprint:
        raise ValueError(f"expert{f' for task {expert.task!r}' if expert.task else ''} was built for a model "
                         f"with fingerprint {expert.fingerprint}, this model's is {fingerprint}: a different "
                         "configuration or FFN layout")


def _record_conversions(model: nn.Module, weights: Sequence[torch.Tensor]) -> None:
    record = model.__dict__.setdefault(_CONVERTED_ATTR, [])
    for w in weights:
        if not any(w is r for r in record):
            record.append(w)


def _apply(state: _State) -> None:
    """Make the model match ``state``. Idempotent: safe to re-run after any interruption."""
    for w in state.planned:
        to_neuron_major_(w, 1)
    target = _Target(state.expert, state.experts, state.grouped, state.batch, state.offsets)
    lead = target.lead()
    staged = lead.stage(state.wrappers[0][0].indices.device)
    offsets = lead.offsets if target.grouped is None else None
    for i, (ws, idx) in enumerate(zip(state.wrappers, staged)):
        grouped = None if target.grouped is None else target.grouped[i]
        table = None if target.offsets is None else target.offsets[i]
        offset = None if offsets is None else offsets[i]
        for w in ws:
            reads = isinstance(w, GatheredGatedMLP) or getattr(w, "mode", None) == "cols"  # the output side
            w.backend = state.backend
            w.compact = state.compact
            if w.indices is not idx:
                w.set_indices(idx, validated=True)
            if reads and (offset is not None or w.offset is not None):
                w.set_offset(offset)
            if grouped is None:
                w.set_groups(None)
            elif (w.mixed is None or w.mixed[0] is not grouped or w.mixed[1] is not target.batch
                  or (reads and (w.group_offsets is None) != (table is None))):
                w.set_groups(grouped, target.batch, table if reads else None)
    for s in state.swaps:
        # One dict store per swap: an interrupt lands before or after it, never inside.
        s.parent._modules[s.attr] = s.wrapper
    state.complete = True


def unplug_(
    model: nn.Module,
    expert: Experts,
    *,
    spec: FFNSpec | Sequence[FFNSpec] | None = None,
    backend: Optional[str] = None,
    layout: Optional[str] = None,
    compact: Optional[bool] = None,
) -> nn.Module:
    """Run only ``expert``'s neurons in every FFN block of ``model``, in place.

    If another expert is installed, switches by swapping index buffers (no weight is touched,
    no device sync).

    Args:
        model: a supported Hugging Face model (or any model ``spec`` describes).
        expert: the TaskExpert to install; or a mapping task name -> TaskExpert to keep several
            resident, each batch row then running the expert ``mixed_batch`` names for it (the
            index lists go to the device once, here; compact does not apply to them).
        spec: FFN layout for a model the registry does not know; on a switch it must name the
            blocks already installed.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch". None keeps
            the installed backend on a switch ("auto" on a fresh install).
        layout: "auto" (re-store down projections neuron-major on CUDA), "neuron_major" or
            "original" (never re-store). None: "auto" on a fresh install, nothing new on a
            switch. The re-store happens in place once; no extra memory stays allocated.
        compact: True multiplies with compacted copies of the expert's kept weights, made on
            its first forward and kept while the expert lives (memory for speed; see
            ``compact_memory`` / ``release_compact``). None keeps the installed choice on a
            switch (False on a fresh install).

    Returns:
        ``model``.
    """
    for name, value, choices in (("backend", backend, BACKENDS), ("layout", layout, LAYOUTS)):
        if value is not None and value not in choices:
            raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    if compact is not None and not isinstance(compact, bool):
        raise TypeError(f"compact: expected True, False or None, got {compact!r}")
    if compact and isinstance(expert, Mapping):
        raise ValueError("compact=True applies to one expert at a time; a mapping of experts runs on the original "
                         "weights (each row gathers its own expert's neurons). Pass a single TaskExpert, or "
                         "compact=None/False")
    with model_lock(model):
        owner, state = _find_state(model)
        if owner is not None and owner is not model:
            name = next(n for n, m in model.named_modules() if m is owner)
            raise ValueError(f"submodule {name!r} of this model is unplugged: switch or restore_ it through "
                             f"model.get_submodule({name!r}), or restore_(model) first")
        if state is not None:
            _switch(model, state, expert, spec, backend, layout, compact)
        else:
            _install(model, expert, spec, backend or "auto", layout or "auto", bool(compact))
        return model


def _install(model, expert, spec, backend, layout, compact: bool) -> None:
    blocks = find_ffn_blocks(model, spec)
    fingerprint = model_fingerprint(model, blocks)
    device = blocks[0].up.weight.device
    target = _target(model, expert, blocks, fingerprint, device)
    check_replaceable(model, blocks)
    resolve_backend(backend, blocks[0].up.weight)  # raises now if the backend cannot run here
    swaps, wrappers = build_swaps(model, blocks, target.lead().stage(device), backend)
    state = _State(target.expert, list(blocks), swaps, wrappers, planned_conversions(blocks, layout), fingerprint, backend,
                   layout, _compact_store(model) if compact else None, experts=target.experts,
                   grouped=target.grouped, batch=target.batch, offsets=target.offsets)
    # Intent first: from here on every step can be redone by _apply or undone by restore_.
    _record_conversions(model, state.planned)
    model.__dict__[_STATE_ATTR] = state
    _apply(state)


def _switch(model, state: _State, expert, spec, backend, layout, compact: Optional[bool]) -> None:
    if spec is not None:
        names = [b.name for b in find_ffn_blocks(model, spec)]
        if names != [b.name for b in state.blocks]:
            raise ValueError(f"spec finds FFN blocks {names}, but the installed expert runs on "
                             f"{[b.name for b in state.blocks]}; restore_ first to change the FFN layout")
    target = _target(model, expert, state.blocks, state.fingerprint, state.wrappers[0][0].indices.device)
    if backend is not None:
        resolve_backend(backend, state.blocks[0].up.weight)
    planned = planned_conversions(state.blocks, layout) if layout is not None else []
    # Intent first, each a single store; _apply then brings the model in line.
    state.complete = False
    _record_conversions(model, planned)
    state.planned = state.planned + [w for w in planned if not any(w is p for p in state.planned)]
    if backend is not None:
        state.backend = backend
    if layout is not None:
        state.layout = layout
    if compact is not None:
        state.compact = _compact_store(model) if compact else None
    vars(state).update(target._asdict())  # one store: expert, experts, grouped, batch, offsets
    _apply(state)


def restore_(model: nn.Module, *, original_layout: bool = False) -> bool:
    """Put the original FFN modules back. Returns False if nothing was unplugged.

    Finds an expert installed on ``model`` or on any of its submodules, and finishes a restore
    or an unplug that was interrupted. original_layout=True also re-stores every weight that
    unplug_ made neuron-major (since the model's last original-layout restore) as a plain
    contiguous tensor again (a copy of those weights; off by default so the next unplug is free).
    """
    with model_lock(model):
        owner, state = _find_state(model)
        if state is not None:
            state.complete = False
            for s in reversed(state.swaps):
                s.parent._modules[s.attr] = s.original
            del owner.__dict__[_STATE_ATTR]
        if original_layout:
            for holder in model.modules():
                for w in holder.__dict__.get(_CONVERTED_ATTR, []):
                    to_row_major_(w)
                holder.__dict__.pop(_CONVERTED_ATTR, None)
        return state is not None


@contextlib.contextmanager
def unplugged(model: nn.Module, expert: Experts, **kwargs):
    """``with unplugged(model, expert): ...`` runs the body on the expert and restores in
    ``finally``, also when the body raises. Holds the model's lock for the whole body, so other
    threads can't switch experts under it. If an expert was installed before, it is put back
    (with the backend it ran on)."""
    with model_lock(model):
        previous = installed(model)
        unplug_(model, expert, **kwargs)
        try:
            yield model
        finally:
            _put_back(model, previous)


def _put_back(model: nn.Module, previous: Optional[Installed]) -> None:
    """Install ``previous`` (as ``installed`` reported it) or, for None, restore the dense model."""
    if previous is None:
        restore_(model)
    else:
        unplug_(model, previous.target, backend=previous.backend, compact=previous.compact)


def _item_groups(state: _State, tasks) -> list[int]:
    """Each item's group: its task's place among the installed experts; None: dense (the last)."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks: expected one task name (or None for a dense item) per batch item, got "
                        f"{type(tasks).__name__}")
    if not tasks:
        raise ValueError("tasks: expected at least one item, got none")
    slots = {name: g for g, name in enumerate(state.experts)}
    for r, task in enumerate(tasks):
        if task is not None and task not in slots:
            raise ValueError(f"tasks: item {r}: unknown task {task!r}; installed: {list(slots)}")
    return [len(slots) if task is None else slots[task] for task in tasks]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, tasks: Optional[Sequence[Optional[str]]] = None, *,
                row_tasks: Optional[Sequence[Optional[str]]] = None):
    """``with mixed_batch(model, tasks): model(**batch)`` runs batch item r of every forward
    inside on the expert of task ``tasks[r]`` (None: the dense model), all items in one pass.

    Needs ``unplug_(model, {task: expert, ...})`` first; touches no weight or module. The
    batch must have ``len(tasks)`` items (dim 0 of every FFN input, or, where a model flattens
    tokens before its FFN as OPT does, items in order); each item's tokens, padding included,
    follow it; ``generate`` works the same. Holds the model's lock for its body. Bad names
    are refused before anything is set; a batch of the wrong size when the model is called
    (or, for a submodule called on its own, at the first FFN), before it computes.
    ``row_tasks=``: the earlier name of ``tasks`` (DeprecationWarning).
    """
    with model_lock(model):
        state = _find_state(model)[1]
        if state is None or state.experts is None:
            raise ValueError("mixed_batch needs several experts resident: unplug_(model, {task: expert, ...}) first")
        if row_tasks is not None:
            warnings.warn("mixed_batch(row_tasks=) is now tasks=", DeprecationWarning, stacklevel=3)
            tasks = row_tasks if tasks is None else tasks
        groups = _item_groups(state, tasks)
        batch = state.batch
        previous = batch.items
        batch.set(groups)
        # OPT flattens tokens before its FFN: note the batch size where it enters (model or base model).
        handles = []
        try:
            for entry in dict.fromkeys([model, getattr(model, "base_model", model)]):
                handles.append(entry.register_forward_pre_hook(batch.size_hook(), with_kwargs=True))
            yield model
        finally:
            for handle in handles:
                handle.remove()
            batch.set(previous)

