"""Unplug and restore in place: swap FFN layers for gathered ones and put them back.

    doe.unplug_(model, expert)        # install (or switch: an index swap)
    doe.restore_(model)               # the original modules, exactly
    with doe.unplugged(model, expert):
        model(**batch)

Nothing is copied: the wrappers hold the original layers by reference. Everything is
validated before the model is touched, so a bad expert leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from doe.architectures import FFNBlock, FFNSpec, find_ffn_blocks
from doe.expert import TaskExpert, model_fingerprint, model_type_of
from doe_kernels import GatheredGatedMLP, GatheredLinear, to_neuron_major_, to_row_major_

__all__ = ["unplug_", "restore_", "unplugged", "is_unplugged", "current_expert", "model_lock", "check_expert"]

_STATE_ATTR = "_doe_unplug_state"
_LOCK_GUARD = threading.Lock()
# Kept outside the model so that copy.deepcopy / pickle of a model still work.
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
LAYOUTS = ("auto", "neuron_major", "original")


@dataclass
class _Swap:
    parent: nn.Module
    attr: str
    original: nn.Module
    wrapper: nn.Module


@dataclass
class _State:
    expert: TaskExpert
    blocks: list[FFNBlock]
    swaps: list[_Swap]
    wrappers: list[list[nn.Module]]  # per block, the wrappers whose indices it sets
    converted: list[torch.Tensor]  # weights re-stored neuron-major by this package
    fingerprint: str


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises switching and inference on ``model``."""
    with _LOCK_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def is_unplugged(model: nn.Module) -> bool:
    return model.__dict__.get(_STATE_ATTR) is not None


def current_expert(model: nn.Module) -> Optional[TaskExpert]:
    state = model.__dict__.get(_STATE_ATTR)
    return state.expert if state is not None else None


def check_expert(model: nn.Module, expert: TaskExpert, blocks: Optional[Sequence[FFNBlock]] = None,
                 fingerprint: Optional[str] = None) -> None:
    """Raise if ``expert`` does not fit ``model`` (type, FFN blocks, neuron counts, fingerprint)."""
    state = model.__dict__.get(_STATE_ATTR)
    if blocks is None:
        blocks = state.blocks if state is not None else find_ffn_blocks(model)
    if fingerprint is None and state is not None:
        fingerprint = state.fingerprint
    if not isinstance(expert, TaskExpert):
        raise TypeError(f"expert: expected a doe.TaskExpert, got {type(expert).__name__}")
    mtype = model_type_of(model)
    if expert.model_type is not None and mtype is not None and expert.model_type != mtype:
        raise ValueError(f"expert was built for a {expert.model_type!r} model, this model is {mtype!r}")
    if expert.num_blocks != len(blocks):
        raise ValueError(f"expert has {expert.num_blocks} FFN blocks, this model has {len(blocks)}")
    for i, (n, block) in enumerate(zip(expert.num_neurons, blocks)):
        if n != block.num_neurons:
            raise ValueError(f"expert block {i} was built for {n} neurons, this model's block "
                             f"{block.name!r} has {block.num_neurons}")
    if expert.fingerprint is not None:
        found = fingerprint or model_fingerprint(model, blocks)
        if found != expert.fingerprint:
            raise ValueError(f"expert{f' for task {expert.task!r}' if expert.task else ''} was built for a model "
                             f"with fingerprint {expert.fingerprint}, this model's is {found}: a different "
                             "configuration or FFN layout")


def _resolve_layout(layout: str, weight: torch.Tensor) -> bool:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    # The Triton cols gather wants each neuron contiguous; the CPU reference does not care, and
    # keeping CPU weights as they are keeps dense CPU outputs bit-identical.
    return layout == "neuron_major" or (layout == "auto" and weight.is_cuda)


def _neuron_major_targets(block: FFNBlock) -> list[torch.Tensor]:
    """Weights whose neuron axis is not yet the outer storage axis: nn.Linear down (H, I) and
    Conv1D up (H, I), neuron axis 1 in both."""
    if block.kind == "conv1d":
        return [block.up.weight]
    return [block.down.weight]


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, attr = path.rpartition(".")
    return (root.get_submodule(head) if head else root), attr


def _build_swaps(model: nn.Module, blocks: Sequence[FFNBlock], expert: TaskExpert, backend: str):
    swaps, wrappers = [], []
    for i, block in enumerate(blocks):
        idx = expert.stage(block.up.weight.device)[i]
        if block.gated:
            act = block.activation if block.activation is not None else block.act_module
            wrapper = GatheredGatedMLP(block.container, block.gate, block.up, block.down, idx,
                                       activation=act, dropout=block.dropout, backend=backend)
            parent, attr = _parent(model, block.name)
            swaps.append(_Swap(parent, attr, block.container, wrapper))
            wrappers.append([wrapper])
            continue
        pair = []
        for name, module, mode in ((block.up_name, block.up, "rows"), (block.down_name, block.down, "cols")):
            wrapper = GatheredLinear(module, idx, mode=mode, backend=backend)
            parent, attr = _parent(block.container, name)
            swaps.append(_Swap(parent, attr, module, wrapper))
            pair.append(wrapper)
        wrappers.append(pair)
    return swaps, wrappers


def unplug_(
    model: nn.Module,
    expert: TaskExpert,
    *,
    spec: FFNSpec | Sequence[FFNSpec] | None = None,
    backend: str = "auto",
    layout: str = "auto",
) -> nn.Module:
    """Run only ``expert``'s neurons in every FFN block of ``model``, in place.

    If another expert is installed, switches by swapping index buffers (no restore, no weight
    touched). layout: "auto" (neuron-major down projections on CUDA, as they are on CPU),
    "neuron_major" or "original" (never re-store). The first unplug on CUDA re-stores the down
    projections neuron-major in place; no extra memory stays allocated. Returns ``model``.
    """
    with model_lock(model):
        state: Optional[_State] = model.__dict__.get(_STATE_ATTR)
        if state is not None:
            check_expert(model, expert, state.blocks, state.fingerprint)
            new = [expert.stage(ws[0].indices.device)[i] for i, ws in enumerate(state.wrappers)]
            for ws, idx in zip(state.wrappers, new):
                for w in ws:
                    w.indices = idx  # validated by TaskExpert; a buffer swap
            state.expert = expert
            return model
        blocks = find_ffn_blocks(model, spec)
        fingerprint = model_fingerprint(model, blocks)
        check_expert(model, expert, blocks, fingerprint)
        targets = [w for b in blocks for w in _neuron_major_targets(b)]
        convert = [w for w in targets if _resolve_layout(layout, w)]
        swaps, wrappers = _build_swaps(model, blocks, expert, backend)
        # From here on nothing validates any more: the model changes.
        converted = [w for w in convert if to_neuron_major_(w, 1)]
        for s in swaps:
            setattr(s.parent, s.attr, s.wrapper)
        model.__dict__[_STATE_ATTR] = _State(expert, list(blocks), swaps, wrappers, converted, fingerprint)
        return model


def restore_(model: nn.Module, *, original_layout: bool = False) -> bool:
    """Put the original FFN modules back. Returns False if nothing was unplugged.

    original_layout=True also re-stores weights that unplug_ made neuron-major as plain
    contiguous tensors again (a copy of those weights; off by default so the next unplug is free).
    """
    with model_lock(model):
        state: Optional[_State] = model.__dict__.pop(_STATE_ATTR, None)
        if state is None:
            return False
        for s in reversed(state.swaps):
            setattr(s.parent, s.attr, s.original)
        if original_layout:
            for w in state.converted:
                to_row_major_(w)
        return True


@contextlib.contextmanager
def unplugged(model: nn.Module, expert: TaskExpert, **kwargs):
    """``with unplugged(model, expert): ...`` runs the body on the expert and restores in
    ``finally``, also when the body raises. Holds the model's lock for the whole body, so other
    threads can't switch experts under it. If an expert was installed before, it is put back."""
    with model_lock(model):
        previous = current_expert(model)
        unplug_(model, expert, **kwargs)
        try:
            yield model
        finally:
            if previous is not None:
                unplug_(model, previous)
            else:
                restore_(model)
