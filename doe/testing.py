"""Model-level helpers for tests and benchmarks: random experts, the hand-sliced reference model,
and the checks that a restored model is the original.

``sliced_copy`` is the independent reference that unplugged (gathered, zero-copy) models are
compared with: new, smaller projections holding ``index_select`` copies of the kept weights,
built without the gathered ops or modules.
"""

from __future__ import annotations

import copy
from typing import Sequence, Union

import torch
import torch.nn as nn

from doe.architectures import FFNSpec, find_ffn_blocks
from doe_kernels import GatheredGatedMLP, GatheredLinear
from doe_kernels.testing import kept_count, random_indices

__all__ = [
    "random_expert_indices",
    "slice_projection",
    "sliced_ffn_modules",
    "sliced_copy", "with_down_bias",
    "snapshot",
    "assert_same_as",
    "gathered_wrappers",
]

Indices = Sequence[Union[Sequence[int], torch.Tensor]]


def random_expert_indices(model: nn.Module, keep: float, seed: int = 0) -> list[torch.Tensor]:
    """Per FFN block of ``model``, ``kept_count(num_neurons, keep)`` sorted random neuron ids
    (int64), all drawn from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [random_indices(b.num_neurons, kept_count(b.num_neurons, keep), generator=g)
            for b in find_ffn_blocks(model)]


def _param(src: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(src, requires_grad=like.requires_grad)


def slice_projection(layer: nn.Module, idx: torch.Tensor, dim: int, pad_to: int = 1) -> nn.Module:
    """A new layer like ``layer`` (nn.Linear, or transformers' Conv1D whose weight is (in, out))
    keeping only neurons ``idx``: its output features for ``dim`` 0 (up / gate), its input
    features for ``dim`` 1 (down). Weights are copied; nothing is shared with ``layer``.

    ``pad_to`` > 1 rounds the neuron count up to a multiple of it with zero neurons (zero weight
    rows / columns and zero bias): the same output, widths that suit cuBLAS's tiles."""
    if dim not in (0, 1):
        raise ValueError(f"dim: expected 0 (rows: output features) or 1 (cols: input features), got {dim}")
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to: expected a positive int, got {pad_to!r}")
    w, b = layer.weight, layer.bias
    conv1d = type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")
    if not (conv1d or isinstance(layer, nn.Linear)):
        raise TypeError(f"cannot slice {type(layer).__name__}")
    w_dim = 1 - dim if conv1d else dim  # the weight axis that indexes neurons
    n = len(idx)
    width = -(-n // pad_to) * pad_to
    n_in = w.shape[0] if conv1d else w.shape[1]
    n_out = w.shape[1] if conv1d else w.shape[0]
    n_in, n_out = (n_in, width) if dim == 0 else (width, n_out)
    with torch.device("meta"):  # no allocation, no RNG draw
        new = type(layer)(n_out, n_in) if conv1d else nn.Linear(n_in, n_out, bias=b is not None)
    kept = w.detach().index_select(w_dim, idx)
    if width > n:
        pad_shape = list(kept.shape)
        pad_shape[w_dim] = width - n
        kept = torch.cat([kept, kept.new_zeros(pad_shape)], dim=w_dim)
    new.weight = _param(kept.contiguous(), w)
    if b is not None:
        b = b.detach()
        if dim == 0:
            b = torch.cat([b.index_select(0, idx), b.new_zeros(width - n)])
        new.bias = _param(b.clone(), layer.bias)
    return new


def sliced_ffn_modules(model: nn.Module, indices: Indices, spec: Union[FFNSpec, Sequence[FFNSpec], None] = None,
                       pad_to: int = 1) -> dict:
    """{id(original projection): its sliced copy} for every up / gate / down projection of
    ``model``, keeping neurons ``indices[i]`` of FFN block i (``find_ffn_blocks`` order), their
    count rounded up to a multiple of ``pad_to`` with zero neurons."""
    blocks = find_ffn_blocks(model, spec)
    if len(indices) != len(blocks):
        raise ValueError(f"expected {len(blocks)} index lists (one per FFN block), got {len(indices)}")
    out = {}
    with torch.no_grad():
        for block, idx in zip(blocks, indices):
            idx = torch.as_tensor(idx, dtype=torch.long).flatten().to(block.up.weight.device)
            for layer, dim in ((block.up, 0), (block.gate, 0), (block.down, 1)):
                if layer is not None:
                    out[id(layer)] = slice_projection(layer, idx, dim, pad_to)
    return out


def sliced_copy(model: nn.Module, indices: Indices, spec: Union[FFNSpec, Sequence[FFNSpec], None] = None,
                pad_to: int = 1) -> nn.Module:
    """A deep copy of ``model`` whose FFN blocks keep only neurons ``indices[i]`` (``pad_to``: see
    :func:`slice_projection`). The full FFN weights are never copied: deepcopy's memo maps each
    original projection to its sliced copy."""
    return copy.deepcopy(model, sliced_ffn_modules(model, indices, spec, pad_to))


def with_down_bias(model: nn.Module, offsets: Sequence[torch.Tensor | None] | None) -> nn.Module:
    """``model`` (e.g. a :func:`sliced_copy`) with each FFN block's down-projection bias plus its
    expert output offset (hidden,) (a new bias where it had none): what an expert's offsets do."""
    for block, off in zip(find_ffn_blocks(model), offsets or ()):
        if off is None:
            continue
        down, off = block.down, off.to(block.down.weight.device, block.down.weight.dtype)
        if getattr(down, "bias", None) is None:
            down.bias = nn.Parameter(off.clone())
        else:
            down.bias.data += off
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything ``restore_`` must give back: state_dict keys, values (cloned) and storage."""
    return {k: (v.detach().clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_same_as(model: nn.Module, snap: dict) -> None:
    """Assert that ``model`` has the keys, values and storage of ``snap`` (from :func:`snapshot`)."""
    sd = model.state_dict()
    assert set(sd) == set(snap)
    for k, v in sd.items():
        assert torch.equal(v, snap[k][0]), k
        assert v.data_ptr() == snap[k][1], f"{k} was re-allocated"


def gathered_wrappers(model: nn.Module) -> list[nn.Module]:
    """The GatheredLinear / GatheredGatedMLP modules installed in ``model``."""
    return [m for m in model.modules() if isinstance(m, (GatheredLinear, GatheredGatedMLP))]
