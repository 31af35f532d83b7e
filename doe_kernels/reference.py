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
    "segmented_linear_ref",
    "segmented_glu_ref",
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


def _segments(table: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """The G entries of a segment table (``doe_kernels.segments``), as host int64 tensors."""
    t = table.detach().to("cpu", torch.int64)
    return [t[int(t[g]):int(t[g + 1])] for g in range(num_groups)]


def _by_group(x: torch.Tensor, table: torch.Tensor, rows_table: torch.Tensor, out_features: int, fn):
    """(M, out_features) with rows of group g set to ``fn(x[rows_g], idx_g)`` (zero-padded on the right)."""
    x2 = x.reshape(-1, x.shape[-1])
    num_groups = rows_table.numel() - x2.shape[0] - 1
    out = x2.new_zeros(x2.shape[0], out_features)
    for idx, members in zip(_segments(table, num_groups), _segments(rows_table, num_groups)):
        if members.numel():
            members = members.to(x.device)
            y = fn(x2.index_select(0, members), idx.to(x.device))
            out = out.index_copy(0, members, F.pad(y, (0, out_features - y.shape[-1])))
    return out.reshape(*x.shape[:-1], out_features)


def segmented_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    table: torch.Tensor,
    rows_table: torch.Tensor,
    *,
    rows: bool,
    width: int,
) -> torch.Tensor:
    """``gathered_linear_ref`` per group of rows (a loop; reads the tables on the host).

    x: (..., K); table / rows_table: a ``GroupedIndices`` and a ``TokenGroups`` table.
    rows=True: out (..., width), row m's first k_g columns ``x[m] @ W[idx_g]^T + b[idx_g]``,
    the rest 0. rows=False: x (..., width), out (..., N) = ``x[m, :k_g] @ W[:, idx_g]^T + b``.
    """
    if rows:
        return _by_group(x, table, rows_table, width, lambda xg, idx: gathered_linear_ref(
            xg, weight, bias, rows=idx))
    return _by_group(x, table, rows_table, weight.shape[0], lambda xg, idx: gathered_linear_ref(
        xg[:, : idx.numel()], weight, bias, cols=idx))


def segmented_glu_ref(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    table: torch.Tensor,
    rows_table: torch.Tensor,
    *,
    width: int,
    activation: str = "silu",
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``gathered_glu_ref`` per group of rows: out (..., width), zero beyond each row's k_g."""
    return _by_group(x, table, rows_table, width, lambda xg, idx: gathered_glu_ref(
        xg, gate_weight, up_weight, rows=idx, activation=activation, gate_bias=gate_bias, up_bias=up_bias))
