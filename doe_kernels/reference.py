"""Plain-PyTorch reference for the gathered ops (index_select + F.linear).

This is the ground truth the Triton kernels are tested against, the baseline the benchmarks
time, and the path that runs on CPU. It copies the kept weights on every call, which is
exactly what the kernels avoid.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "activation_fn",
    "activation_grad",
    "canonical_activation",
    "gathered_linear_ref",
    "gathered_glu_ref",
]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: Activations the fused GLU kernel implements, by name. Aliases follow transformers' ACT2FN.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
}
_ALIASES = {
    "swish": "silu",
    "gelu_erf": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def canonical_activation(name: str) -> str:
    """Map an activation name (incl. transformers' aliases) to one of ``ACTIVATIONS``."""
    key = _ALIASES.get(name, name)
    if key not in ACTIVATIONS:
        known = sorted(set(ACTIVATIONS) | set(_ALIASES))
        raise ValueError(f"activation: expected one of {known}, got {name!r}")
    return key


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[canonical_activation(name)]


def activation_grad(name: str, g: torch.Tensor) -> torch.Tensor:
    """d act(g) / dg, elementwise, in closed form (usable inside traced backward passes)."""
    name = canonical_activation(name)
    if name == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(g * 0.7071067811865476)) + g * torch.exp(-0.5 * g * g) * 0.3989422804014327
    if name == "gelu_tanh":
        c = 0.7978845608028654
        t = torch.tanh(c * (g + 0.044715 * g**3))
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)
    return (g > 0).to(g.dtype)


def _index_select(weight: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    # A transposed view (neuron-major storage, Conv1D) is gathered through its contiguous
    # transpose, which copies whole rows instead of strided elements.
    if weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        return weight.t().index_select(1 - dim, idx).t()
    return weight.index_select(dim, idx)


def gathered_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear`` on the kept rows or columns of ``weight``.

    x: (..., K) with K = in_features (rows) or len(cols) (cols); weight: (N, K_full) as in
    nn.Linear; bias: (N,). rows: (n,) -> out (..., n); cols: (k,) -> out (..., N).
    """
    if (rows is None) == (cols is None):
        raise ValueError("gathered_linear_ref: give exactly one of rows= or cols=")
    if rows is not None:
        rows = rows.to(device=weight.device, dtype=torch.long)
        w = _index_select(weight, 0, rows)
        b = bias.index_select(0, rows) if bias is not None else None
        return F.linear(x, w, b)
    cols = cols.to(device=weight.device, dtype=torch.long)
    return F.linear(x, _index_select(weight, 1, cols), bias)


def gathered_glu_ref(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    activation: str = "silu",
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(x @ Wg[rows]^T + bg[rows]) * (x @ Wu[rows]^T + bu[rows])``.

    x: (..., K); gate_weight, up_weight: (N, K); rows: (n,) -> out (..., n).
    """
    act = activation_fn(activation)
    g = gathered_linear_ref(x, gate_weight, gate_bias, rows=rows)
    u = gathered_linear_ref(x, up_weight, up_bias, rows=rows)
    return act(g) * u

