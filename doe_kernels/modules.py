"""Drop-in modules that run only the kept neurons of an existing layer.

Each wraps the original layer *by reference* as ``base_layer`` and takes its place in the
model while looking like it from outside:

- the wrapper shares the original's ``_parameters`` and ``_modules`` dicts, so
  ``named_parameters``, ``state_dict`` and ``load_state_dict`` (also ``assign=True``) of a
  model with wrappers installed have exactly the original keys and tensors, and whatever they
  change reaches the original layer;
- the kept neuron ids are a non-persistent int32 buffer, so they never enter a state dict;
- forward hooks and forward pre-hooks registered on the original layer (and, for a gated
  block, on its gate / up / down projections) fire as they would without the wrapper; they
  see the gathered tensors (``len(indices)`` features on the neuron side).

Switching experts is ``set_indices``. Nothing here knows about tasks or model families; the
``doe`` package decides what to wrap.

Opt-in, memory for speed: a wrapper given a :class:`CompactWeights` store multiplies with
compacted copies of its kept rows or columns, made once per (weight, kept ids) and kept while
both live, instead of gathering on every forward (where a gather costs more than it saves, as
on CPU).

Mixed batches: ``set_groups(grouped, batch)`` gives a wrapper the kept lists of several groups
(``doe_kernels.segments.GroupedIndices``) and a ``BatchGroups`` shared by the model's wrappers;
each batch row then runs its own group's neurons (the segmented ops), and the wrapper's own
``indices`` are not used until ``set_groups(None)``. The rows gather's output h is laid out as
``segmented_linear`` documents (padded per row, or the union's columns at decode sizes), so
forward hooks on the up projection see that layout.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from doe_kernels.dispatch import resolve_backend
from doe_kernels.ops.api import glu_unchecked, linear_unchecked, segmented_glu_unchecked, segmented_linear_unchecked
from doe_kernels.reference import activation_fn, canonical_activation
from doe_kernels.segments import BatchGroups, GroupedIndices, choose_path, mixed_width
from doe_kernels.compact import CompactWeights, compact_glu, compact_linear, use_compact
from doe_kernels.validation import (
    check_glu_args,
    check_linear_args,
    check_segmented_args,
    check_segmented_glu_args,
    glu_args_ok,
    linear_args_ok,
    stale_weight_error,
    validate_indices,
)

__all__ = [
    "GatheredLinear",
    "GatheredGatedMLP",
    "linear_weight",
    "is_neuron_major",
    "to_neuron_major_",
    "to_row_major_",
    "hooked_modules",
    "unwrap",
]


def _is_conv1d(layer: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight (in, out); matched by name to keep
    # doe_kernels free of a transformers import.
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view, without a copy."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if _is_conv1d(layer):
        return layer.weight.t()
    raise TypeError(f"expected an nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def is_neuron_major(weight: torch.Tensor, neuron_dim: int) -> bool:
    """True when each neuron's weights (a slice along ``neuron_dim``) are one contiguous run."""
    other = 1 - neuron_dim
    return weight.stride(other) == 1 and weight.stride(neuron_dim) >= weight.shape[other]


def to_neuron_major_(weight: torch.Tensor, neuron_dim: int) -> bool:
    """Re-store a 2-D parameter in place so that ``neuron_dim`` is its outer storage axis.

    The Parameter object, its shape and its values stay the same; it becomes a transposed view
    of a contiguous buffer and the old storage is freed. Returns True if it converted.
    """
    if weight.dim() != 2 or neuron_dim not in (0, 1):
        raise ValueError(f"expected a 2-D weight and neuron_dim 0 or 1, got {tuple(weight.shape)}, {neuron_dim}")
    if is_neuron_major(weight, neuron_dim):
        return False
    with torch.no_grad():
        if neuron_dim == 1:
            weight.data = weight.data.t().contiguous().t()
        else:
            weight.data = weight.data.contiguous()
    return True


def to_row_major_(weight: torch.Tensor) -> bool:
    """Undo ``to_neuron_major_``: make the parameter a plain contiguous tensor again."""
    if weight.is_contiguous():
        return False
    with torch.no_grad():
        weight.data = weight.data.contiguous()
    return True


def hooked_modules(module: nn.Module, kinds: tuple[str, ...] = ("backward", "state_dict")) -> list[str]:
    """Names of the hook kinds registered on ``module`` among ``kinds``.

    kinds: "forward" (forward and forward pre-hooks), "backward" (full backward and backward
    pre-hooks) and "state_dict" (state-dict and load-state-dict hooks).
    """
    attrs = {
        "forward": ("_forward_hooks", "_forward_pre_hooks"),
        "backward": ("_backward_hooks", "_backward_pre_hooks"),
        "state_dict": ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                       "_load_state_dict_post_hooks"),
    }
    return [a.lstrip("_") for kind in kinds for a in attrs[kind] if getattr(module, a, None)]


def _call_hooked(module: nn.Module, fn: Callable, *args):
    """``fn(*args)`` with ``module``'s forward pre-hooks and forward hooks run around it, as
    ``module(*args)`` would run them around ``module.forward``."""
    kwargs: dict = {}
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    out = fn(*args, **kwargs)
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, out)
        else:
            result = hook(module, args, out)
        if result is not None:
            out = result
    return out


def _linear(x, weight, bias, idx, rows: bool, total: int, backend: str, name: str) -> torch.Tensor:
    """A gathered linear on a wrapper's own indices (validated against ``total`` when set):
    the cheap metadata check, the full one only to raise, then the unchecked op."""
    if not linear_args_ok(x, weight, bias, idx, rows, total):
        check_linear_args(x, weight, bias, idx if rows else None, None if rows else idx)
        raise stale_weight_error(name, total, weight)
    return linear_unchecked(x, weight, bias, idx, rows, backend)


def _plan(mixed: tuple, x: torch.Tensor) -> tuple:
    """(grouped, groups, path, width) of a wrapper's mixed state for input x: the row groups of
    the current batch, the path (the same for a block's up and down projections) and h's width;
    worked out once per layer and batch."""
    grouped, batch = mixed
    groups = batch.rows_for(x)
    plan = groups.plans.get(grouped)
    if plan is None:
        path = choose_path(grouped, groups)
        plan = groups.plans[grouped] = (grouped, groups, path, mixed_width(grouped, groups, path))
    return plan


def _segmented(x, weight, bias, plan: tuple, rows: bool, backend: str) -> torch.Tensor:
    """The segmented linear of a mixed batch: its metadata check, then the unchecked op."""
    grouped, groups, path, width = plan
    check_segmented_args(x, weight, bias, grouped, groups, rows, width)
    return segmented_linear_unchecked(x, weight, bias, grouped, groups, rows, path, backend)


def _weight_bias(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(module.weight, module.bias)``, read from the parameter dict when they live there
    (attribute lookup on an nn.Module is slow); parametrized layers fall back to getattr."""
    params = module._parameters
    w = params.get("weight")
    if w is None:
        w = module.weight
    return w, (params["bias"] if "bias" in params else getattr(module, "bias", None))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _plus(bias: Optional[torch.Tensor], offset: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The bias a cols gather runs with: the layer's own plus the wrapper's output offset."""
    if offset is None:
        return bias
    return offset if bias is None else bias + offset


def _group_offset(y: torch.Tensor, table: Optional[torch.Tensor], groups) -> torch.Tensor:
    """y (..., out) of a mixed batch plus its row's group's offset: table (G, out), ``groups`` the
    batch's TokenGroups (one group per row of y)."""
    if table is None:
        return y
    rows = groups.plans.get("row_groups")
    if rows is None:
        rows = groups.plans["row_groups"] = groups.row_groups.long()
    return y + table.index_select(0, rows).view(y.shape)


def unwrap(module: nn.Module) -> nn.Module:
    """The original layer behind a gathered wrapper, or ``module`` itself."""
    return module.base_layer if isinstance(module, _Wrapper) else module


class _Wrapper(nn.Module):
    """Shares ``base``'s parameter and submodule dicts (see the module docstring) and holds
    ``indices``, the kept neuron ids, as a non-persistent buffer. ``compact``: a
    :class:`CompactWeights` store to multiply with compacted copies instead of gathering
    (None: gather, the default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out), through the base layer's own forward hooks if it has any."""
        base = self.base_layer
        if base._forward_hooks or base._forward_pre_hooks:
            return _call_hooked(base, self._gathered, x)
        return self._gathered(x)

    def __init__(self, base: nn.Module, indices: torch.Tensor, total: int, name: str, device: torch.device):
        if base._buffers:
            # A buffer would live in two dicts: .to() or load_state_dict(assign=True) would reach
            # only one of them.
            raise TypeError(f"{type(base).__name__} holds buffers {sorted(base._buffers)}; gathered modules wrap "
                            "layers whose state is parameters and submodules only")
        super().__init__()
        self.__dict__["base_layer"] = base  # not a submodule: its parameters appear once, unprefixed
        self._parameters = base._parameters
        self._modules = base._modules
        self.training = base.training
        self.total = total
        self._name = name
        self.compact: Optional[CompactWeights] = None
        self.mixed: Optional[tuple[GroupedIndices, BatchGroups]] = None
        self.register_buffer("indices", validate_indices(indices, total, name=name).to(device), persistent=False)
        self.register_buffer("offset", None, persistent=False)
        self.register_buffer("group_offsets", None, persistent=False)  # (G, out) while mixed, or None

    def _set_offset(self, offset: Optional[torch.Tensor], out_features: int, weight: torch.Tensor) -> None:
        if offset is None:
            self.offset = None
            return
        if not isinstance(offset, torch.Tensor) or offset.dim() != 1 or offset.numel() != out_features:
            got = tuple(offset.shape) if isinstance(offset, torch.Tensor) else type(offset).__name__
            raise ValueError(f"{self._name}: expected an output offset of shape ({out_features},), got {got}")
        if not torch.isfinite(offset).all():
            raise ValueError(f"{self._name}: the output offset holds NaN or infinite values")
        self.offset = offset.detach().to(device=weight.device, dtype=weight.dtype)

    def _offset_layer(self) -> tuple[int, torch.Tensor]:
        """(out, weight): the width of this module's output offsets and the weight whose dtype
        and device they take (the layer that reads the kept neurons)."""
        raise NotImplementedError

    def set_groups(self, grouped: Optional[GroupedIndices], batch: Optional[BatchGroups] = None,
                   offsets: Optional[torch.Tensor] = None) -> None:
        """Run each batch row on its own group's kept neurons: ``grouped`` holds the G groups'
        lists (over this layer's ``total`` neurons, on the device of ``indices``) and ``batch``
        (shared by the model's wrappers) says which group each row of a forward belongs to.
        ``offsets`` (G, out): added to each row's output by its group (as ``set_offset`` for one
        list; zeros for a group without one). None goes back to ``indices`` for every row."""
        if grouped is None:
            self.mixed = None
            self.group_offsets = None
            return
        if not isinstance(grouped, GroupedIndices) or not isinstance(batch, BatchGroups):
            raise TypeError(f"{self._name}: expected a GroupedIndices and a BatchGroups, got "
                            f"{type(grouped).__name__} and {type(batch).__name__}")
        if grouped.total != self.total or grouped.device != self.indices.device:
            raise ValueError(f"{self._name}: expected groups over {self.total} neurons on {self.indices.device}, got "
                             f"{grouped.total} on {grouped.device}")
        if batch.num_groups != grouped.num_groups:
            raise ValueError(f"{self._name}: the batch assigns {batch.num_groups} groups, the lists hold "
                             f"{grouped.num_groups}")
        if offsets is not None:
            width, weight = self._offset_layer()
            if (not isinstance(offsets, torch.Tensor) or offsets.dim() != 2
                    or tuple(offsets.shape) != (grouped.num_groups, width)):
                got = tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__
                raise ValueError(f"{self._name}: expected group offsets of shape ({grouped.num_groups}, {width}), "
                                 f"got {got}")
            if not torch.isfinite(offsets).all():
                raise ValueError(f"{self._name}: the group offsets hold NaN or infinite values")
            offsets = offsets.detach().to(device=weight.device, dtype=weight.dtype)
        self.mixed = (grouped, batch)
        self.group_offsets = offsets

    def set_indices(self, indices: torch.Tensor, *, validated: bool = False, in_place: bool = False) -> None:
        """Switch to another kept set (an index swap; no weight is touched).

        indices: (n,) sorted unique neuron ids. ``validated=True`` skips the value checks (which
        read the tensor: a device sync) for ids already checked by ``validate_indices`` and
        living on this module's device; metadata is still checked. ``in_place=True`` copies
        the ids into the current buffer instead of rebinding it, so a captured CUDA graph sees
        them; it needs ``n`` equal to the current count.
        """
        if not validated:
            indices = validate_indices(indices, self.total, name=self._name).to(self.indices.device)
        elif (not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 1
                or not 0 < indices.numel() <= self.total or indices.device != self.indices.device):
            got = (f"{tuple(indices.shape)} {indices.dtype} on {indices.device}" if isinstance(indices, torch.Tensor)
                   else type(indices).__name__)
            raise ValueError(f"{self._name}: expected a validated 1-D int32 tensor of 1..{self.total} ids on "
                             f"{self.indices.device}, got {got}")
        if not in_place:
            self.indices = indices
            return
        if indices.shape != self.indices.shape:
            raise ValueError(f"{self._name}: an in-place switch needs {self.indices.numel()} ids (the current "
                             f"count), got {indices.numel()}")
        self.indices.copy_(indices)

    def _kept(self) -> str:
        if self.mixed is not None:
            return f"groups={self.mixed[0].num_groups}, kept={list(self.mixed[0].counts)}/{self.total}"
        return f"kept={self.indices.numel()}/{self.total}"

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_layer.training = mode
        return self


class GatheredLinear(_Wrapper):
    """Runs an nn.Linear / Conv1D on kept neurons only.

    mode="rows": keep output neurons (up / gate / fc1 / wi): (..., in) -> (..., n).
    mode="cols": keep input neurons (down / fc2 / wo):       (..., n)  -> (..., out).
    indices: (n,) sorted unique neuron ids; validated here (once), not in forward.
    ``weight`` and ``bias`` are the base layer's own parameters (Conv1D: weight (in, out)).
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, *, mode: str, backend: str = "auto"):
        if mode not in ("rows", "cols"):
            raise ValueError(f"mode: expected 'rows' or 'cols', got {mode!r}")
        weight = linear_weight(base_layer)
        total = weight.shape[0] if mode == "rows" else weight.shape[1]
        super().__init__(base_layer, indices, total, f"{mode} indices", weight.device)
        self._transposed = _is_conv1d(base_layer)  # decided once: forward stays thin
        self.mode = mode
        self.backend = backend

    def set_offset(self, offset: Optional[torch.Tensor]) -> None:
        """Add ``offset`` (out,) to every output (cols mode only), e.g. the mean contribution of
        the neurons left out; None removes it. Stored in the weight's dtype on its device."""
        if self.mode != "cols":
            raise ValueError(f"{self._name}: an output offset belongs to the layer that reads the kept neurons "
                             f"(mode='cols'), this one has mode={self.mode!r}")
        w = linear_weight(self.base_layer)  # (out, in) for Conv1D too
        self._set_offset(offset, w.shape[0], w)

    def _offset_layer(self) -> tuple[int, torch.Tensor]:
        if self.mode != "cols":
            raise ValueError(f"{self._name}: an output offset belongs to the layer that reads the kept neurons "
                             f"(mode='cols'), this one has mode={self.mode!r}")
        w = linear_weight(self.base_layer)
        return w.shape[0], w

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        w, b = _weight_bias(self.base_layer)
        if self.mixed is not None:
            plan = _plan(self.mixed, x)
            return _group_offset(_segmented(x, w.t() if self._transposed else w, b, plan, self.mode == "rows",
                                            resolve_backend(self.backend, x)), self.group_offsets, plan[1])
        compact = use_compact(self.compact, w)
        if compact is not None:
            return compact_linear(compact, x, w, b, self._buffers["indices"], self.mode == "rows", self.total,
                                  self._name, self._transposed, self.offset)
        if self._transposed:
            w = w.t()
        return _linear(x, w, _plus(b, self.offset), self._buffers["indices"], self.mode == "rows", self.total,
                       resolve_backend(self.backend, x), self._name)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, {self._kept()}, base_layer={self.base_layer!r}"


class GatheredGatedMLP(_Wrapper):
    """Replaces a whole gated FFN block: ``down(dropout(act(gate(x)) * up(x)))`` on kept neurons.

    gate, up, down: nn.Linear layers that live inside ``base_layer`` (the original block, kept
    by reference; its submodules are this module's submodules). activation: a name the fused
    kernel knows ("silu", "gelu", "gelu_tanh", "relu", or an alias) -> one fused kernel; or any
    callable -> gate and up are gathered separately and the callable is applied in PyTorch.
    Forward hooks on gate / up / down also take the separate path, so that each fires with its
    own output. x: (..., hidden) -> (..., hidden).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        gate: nn.Linear,
        up: nn.Linear,
        down: nn.Linear,
        indices: torch.Tensor,
        *,
        activation: Union[str, Callable[[torch.Tensor], torch.Tensor]],
        dropout: Optional[nn.Module] = None,
        backend: str = "auto",
    ):
        for name, layer in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name}: expected nn.Linear, got {type(layer).__name__}")
        if gate.weight.shape != up.weight.shape or down.weight.shape[1] != up.weight.shape[0]:
            raise ValueError(
                f"gated FFN shapes disagree: gate {tuple(gate.weight.shape)}, up {tuple(up.weight.shape)}, "
                f"down {tuple(down.weight.shape)} (expected gate == up == (I, H) and down == (H, I))"
            )
        activation = canonical_activation(activation) if isinstance(activation, str) else activation
        super().__init__(base_layer, indices, up.weight.shape[0], "gated FFN indices", up.weight.device)
        # In __dict__: an activation module must not be registered into the shared submodules.
        self.__dict__["activation"] = activation
        # A tuple, so nn.Module does not register them twice: they live in the shared submodules.
        self._layers = (gate, up, down, dropout)
        self.backend = backend

    def set_offset(self, offset: Optional[torch.Tensor]) -> None:
        """Add ``offset`` (hidden,) to every output, e.g. the mean contribution of the neurons
        left out; None removes it. Stored in the weight's dtype on its device."""
        down = self._layers[2]
        self._set_offset(offset, down.weight.shape[0], down.weight)

    def _offset_layer(self) -> tuple[int, torch.Tensor]:
        w = self._layers[2].weight
        return w.shape[0], w

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down, dropout = self._layers
        idx, total, name = self._buffers["indices"], self.total, self._name
        backend = resolve_backend(self.backend, x)
        hooked = _has_hooks(gate) or _has_hooks(up) or _has_hooks(down)
        plan = None if self.mixed is None else _plan(self.mixed, x)
        compact = (None if plan is not None or self.compact is None
                   else use_compact(self.compact, _weight_bias(up)[0]))

        def linear(layer: nn.Module, t: torch.Tensor, rows: bool) -> torch.Tensor:
            w, b = _weight_bias(layer)  # read after the layer's pre-hooks, as layer(t) would
            offset = None if rows else self.offset
            if plan is not None:
                return _group_offset(_segmented(t, w, b, plan, rows, backend), None if rows else self.group_offsets,
                                     plan[1])
            if compact is not None:
                return compact_linear(compact, t, w, b, idx, rows, total, name, offset=offset)
            return _linear(t, w, _plus(b, offset), idx, rows, total, backend, name)

        if isinstance(self.activation, str) and not hooked and plan is not None:
            (wg, bg), (wu, bu) = _weight_bias(gate), _weight_bias(up)
            grouped, groups, path, _ = plan
            check_segmented_glu_args(x, wg, wu, bg, bu, grouped, groups)
            h = segmented_glu_unchecked(x, wg, wu, bg, bu, grouped, groups, self.activation, path, backend)
        elif isinstance(self.activation, str) and not hooked and compact is not None:
            (wg, bg), (wu, bu) = _weight_bias(gate), _weight_bias(up)
            h = compact_glu(compact, x, wg, bg, wu, bu, idx, activation_fn(self.activation), total, name)
        elif isinstance(self.activation, str) and not hooked:
            wg, bg = _weight_bias(gate)
            wu, bu = _weight_bias(up)
            if not glu_args_ok(x, wg, wu, bg, bu, idx, total):
                check_glu_args(x, wg, wu, idx, bg, bu)
                raise stale_weight_error(name, total, wu)
            h = glu_unchecked(x, wg, wu, bg, bu, idx, self.activation, backend)
        else:
            act = activation_fn(self.activation) if isinstance(self.activation, str) else self.activation
            g = _call_hooked(gate, lambda t: linear(gate, t, True), x)
            u = _call_hooked(up, lambda t: linear(up, t, True), x)
            h = act(g) * u
        # An eval-mode nn.Dropout without hooks returns its input: skip the module call.
        if dropout is not None and (dropout.training or type(dropout) is not nn.Dropout or _has_hooks(dropout)):
            h = dropout(h)
        wd = _weight_bias(down)[0]
        if h.dtype != wd.dtype:
            h = h.to(wd.dtype)
        if hooked:
            return _call_hooked(down, lambda t: linear(down, t, False), h)
        return linear(down, h, False)

    def extra_repr(self) -> str:
        act = self.activation if isinstance(self.activation, str) else type(self.activation).__name__
        fused = "fused" if isinstance(self.activation, str) else "unfused"
        return f"activation={act} ({fused}), {self._kept()}"
