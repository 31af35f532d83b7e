"""Drop-in modules that run only the kept neurons of an existing layer.

Each wraps the original layer *by reference* as ``base_layer`` (its parameters are shared,
never copied) and holds the kept neuron ids as a non-persistent int32 buffer, so the model's
``state_dict`` is unchanged and switching experts is ``set_indices``. Nothing here knows
about tasks or model families; the ``doe`` package decides what to wrap.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from doe_kernels.ops import gathered_glu, gathered_linear
from doe_kernels.reference import canonical_activation
from doe_kernels.validation import validate_indices

__all__ = [
    "GatheredLinear",
    "GatheredGatedMLP",
    "linear_weight",
    "is_neuron_major",
    "to_neuron_major_",
    "to_row_major_",
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


class GatheredLinear(nn.Module):
    """Runs an nn.Linear / Conv1D on kept neurons only.

    mode="rows": keep output neurons (up / gate / fc1 / wi): (..., in) -> (..., n).
    mode="cols": keep input neurons (down / fc2 / wo):       (..., n)  -> (..., out).
    indices: (n,) sorted unique neuron ids; validated here (once), not in forward.
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, *, mode: str, backend: str = "auto"):
        super().__init__()
        if mode not in ("rows", "cols"):
            raise ValueError(f"mode: expected 'rows' or 'cols', got {mode!r}")
        weight = linear_weight(base_layer)
        self.base_layer = base_layer
        self._transposed = _is_conv1d(base_layer)  # decided once: forward stays thin
        self.mode = mode
        self.backend = backend
        self.total = weight.shape[0] if mode == "rows" else weight.shape[1]
        self.register_buffer("indices", self._checked(indices, weight.device), persistent=False)

    def _checked(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        return validate_indices(indices, self.total, name=f"{self.mode} indices").to(device)

    def set_indices(self, indices: torch.Tensor) -> None:
        """Switch to another kept set (an index swap; no weight is touched)."""
        self.indices = self._checked(indices, self.indices.device)

    @property
    def weight(self) -> torch.Tensor:
        return linear_weight(self.base_layer)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight.t() if self._transposed else self.base_layer.weight
        if self.mode == "rows":
            return gathered_linear(x, w, self.base_layer.bias, rows=self.indices, backend=self.backend)
        return gathered_linear(x, w, self.base_layer.bias, cols=self.indices, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, kept={self.indices.numel()}/{self.total}"


class GatheredGatedMLP(nn.Module):
    """Replaces a whole gated FFN block: ``down(dropout(act(gate(x)) * up(x)))`` on kept neurons.

    gate, up, down: nn.Linear layers that live inside ``base_layer`` (the original block, kept
    by reference). activation: a name the fused kernel knows ("silu", "gelu", "gelu_tanh",
    "relu", or an alias) -> one fused kernel; or any callable -> gate and up are gathered
    separately and the callable is applied in PyTorch. x: (..., hidden) -> (..., hidden).
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
        super().__init__()
        for name, layer in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name}: expected nn.Linear, got {type(layer).__name__}")
        if gate.weight.shape != up.weight.shape or down.weight.shape[1] != up.weight.shape[0]:
            raise ValueError(
                f"gated FFN shapes disagree: gate {tuple(gate.weight.shape)}, up {tuple(up.weight.shape)}, "
                f"down {tuple(down.weight.shape)} (expected gate == up == (I, H) and down == (H, I))"
            )
        self.activation = canonical_activation(activation) if isinstance(activation, str) else activation
        self.base_layer = base_layer
        # A tuple, so nn.Module does not register them twice: they live under base_layer.
        self._layers = (gate, up, down, dropout)
        self.backend = backend
        self.total = up.weight.shape[0]
        self.register_buffer("indices", self._checked(indices, up.weight.device), persistent=False)

    def _checked(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        return validate_indices(indices, self.total, name="gated FFN indices").to(device)

    def set_indices(self, indices: torch.Tensor) -> None:
        self.indices = self._checked(indices, self.indices.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down, dropout = self._layers
        idx = self.indices
        if isinstance(self.activation, str):
            h = gathered_glu(
                x, gate.weight, up.weight, rows=idx, activation=self.activation,
                gate_bias=gate.bias, up_bias=up.bias, backend=self.backend,
            )
        else:
            g = gathered_linear(x, gate.weight, gate.bias, rows=idx, backend=self.backend)
            h = self.activation(g) * gathered_linear(x, up.weight, up.bias, rows=idx, backend=self.backend)
        if dropout is not None:
            h = dropout(h)
        if h.dtype != down.weight.dtype:
            h = h.to(down.weight.dtype)
        return gathered_linear(h, down.weight, down.bias, cols=idx, backend=self.backend)

    def extra_repr(self) -> str:
        act = self.activation if isinstance(self.activation, str) else type(self.activation).__name__
        fused = "fused" if isinstance(self.activation, str) else "unfused"
        return f"activation={act} ({fused}), kept={self.indices.numel()}/{self.total}"
