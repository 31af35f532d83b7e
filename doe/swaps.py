"""The module surgery of ``unplug_``: which FFN layers a gathered wrapper replaces, where, and
which weights are re-stored neuron-major first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from doe.architectures import FFNBlock
from doe_kernels import GatheredGatedMLP, GatheredLinear
from doe_kernels.modules import hooked_modules, is_neuron_major, unwrap

__all__ = ["Swap", "build_swaps", "check_replaceable", "neuron_major_targets", "parent_of", "planned_conversions",
           "wants_neuron_major"]


@dataclass
class Swap:
    """One module of ``parent`` (at ``attr``) and the wrapper that stands in for it."""

    parent: nn.Module
    attr: str
    original: nn.Module
    wrapper: nn.Module


def wants_neuron_major(layout: str, weight: torch.Tensor) -> bool:
    # The Triton cols gather wants each neuron contiguous; the CPU reference does not care, and
    # keeping CPU weights as they are keeps dense CPU outputs bit-identical.
    return layout == "neuron_major" or (layout == "auto" and weight.is_cuda)


def neuron_major_targets(block: FFNBlock) -> list[torch.Tensor]:
    """Weights whose neuron axis is not yet the outer storage axis: nn.Linear down (H, I) and
    Conv1D up (H, I), neuron axis 1 in both."""
    if block.kind == "conv1d":
        return [block.up.weight]
    return [block.down.weight]


def planned_conversions(blocks: Sequence[FFNBlock], layout: str) -> list[torch.Tensor]:
    """The weights ``layout`` wants re-stored neuron-major that are not yet."""
    return [w for b in blocks for w in neuron_major_targets(b)
            if wants_neuron_major(layout, w) and not is_neuron_major(w, 1)]


def parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, attr = path.rpartition(".")
    return (root.get_submodule(head) if head else root), attr


def check_replaceable(model: nn.Module, blocks: Sequence[FFNBlock]) -> None:
    """Refuse stray wrappers (installed through an enclosing module) and hooks that a wrapper
    cannot honour."""
    if any(unwrap(m) is not m for m in model.modules()):
        raise ValueError("this model already runs gathered FFN modules installed by unplug_ on an enclosing "
                         "module: switch or restore_ through that module")
    problems = []
    for block in blocks:
        named = [(block.name, block.container)] if block.gated else []
        for path, module in ((block.up_name, block.up), (block.down_name, block.down),
                             (block.gate_name, block.gate)):
            if module is not None:
                named.append((f"{block.name}.{path}" if block.name else path, module))
        for name, module in named:
            kinds = hooked_modules(module)
            if kinds:
                problems.append(f"{name!r} ({', '.join(kinds)})")
    if problems:
        raise ValueError("cannot unplug: backward or state-dict hooks are registered on FFN modules that a gathered "
                         f"module replaces: {'; '.join(problems)}. Forward hooks are fine; remove the others "
                         "(handle.remove()) first")


def build_swaps(model: nn.Module, blocks: Sequence[FFNBlock], staged: Sequence[torch.Tensor], backend: str):
    """The wrapper of each FFN block on its staged index list, and where each goes: (swaps, the
    wrappers of each block)."""
    swaps, wrappers = [], []
    for block, idx in zip(blocks, staged):
        if block.gated:
            act = block.activation if block.activation is not None else block.act_module
            if block.act_module is not None and hooked_modules(block.act_module, ("forward",)):
                act = block.act_module  # called as a module, so its hooks fire
            wrapper = GatheredGatedMLP(block.container, block.gate, block.up, block.down, idx,
                                       activation=act, dropout=block.dropout, backend=backend)
            parent, attr = parent_of(model, block.name)
            swaps.append(Swap(parent, attr, block.container, wrapper))
            wrappers.append([wrapper])
            continue
        pair = []
        for name, module, mode in ((block.up_name, block.up, "rows"), (block.down_name, block.down, "cols")):
            wrapper = GatheredLinear(module, idx, mode=mode, backend=backend)
            parent, attr = parent_of(block.container, name)
            swaps.append(Swap(parent, attr, module, wrapper))
            pair.append(wrapper)
        wrappers.append(pair)
    return swaps, wrappers
