"""Public gathered ops: checks, backend dispatch, then the Triton custom op or the reference.

``linear_unchecked`` / ``glu_unchecked`` (and the ``segmented_*`` forms) are the part after
the checks, for callers that guarantee the metadata themselves (the wrapper modules); they
are not exported.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from doe_kernels.dispatch import resolve_backend
from doe_kernels.reference import (
    activation_fn,
    canonical_activation,
    gathered_glu_ref,
    gathered_linear_ref,
    segmented_glu_ref,
    segmented_linear_ref,
)
from doe_kernels.segments import GroupedIndices, TokenGroups, choose_path, mixed_width
from doe_kernels.validation import check_glu_args, check_linear_args, check_segmented_args, check_segmented_glu_args

__all__ = ["gathered_linear", "gathered_glu", "segmented_linear", "segmented_glu"]


def linear_unchecked(x, weight, bias, idx, rows: bool, backend: str) -> torch.Tensor:
    """``gathered_linear`` after its checks: metadata already checked, ``backend`` resolved
    ("triton" or "torch"). ``rows`` True gathers output neurons, False input neurons."""
    if backend == "torch":
        if rows:
            return gathered_linear_ref(x, weight, bias, rows=idx)
        return gathered_linear_ref(x, weight, bias, cols=idx)
    from doe_kernels.ops.gathered_linear_kernel import gathered_linear_call

    return gathered_linear_call(x, weight, bias, idx, rows)


def glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation: str, backend: str) -> torch.Tensor:
    """``gathered_glu`` after its checks: metadata already checked, ``activation`` canonical,
    ``backend`` resolved ("triton" or "torch")."""
    if backend == "torch":
        return gathered_glu_ref(
            x, gate_weight, up_weight, rows=idx, activation=activation, gate_bias=gate_bias, up_bias=up_bias
        )
    from doe_kernels.ops.gathered_glu_kernel import gathered_glu_call

    return gathered_glu_call(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation)


def gathered_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear`` on the kept rows or columns of ``weight``, reading the original weight.

    x: (..., K), any strides. weight: (N, K_full) as in nn.Linear, any strides (row-major or a
    neuron-major transposed view). bias: (N,) or None. Exactly one of:
      rows: (n,) int32/int64 -> ``F.linear(x, weight[rows], bias[rows])``, x (..., K_full), out (..., n)
      cols: (k,) int32/int64 -> ``F.linear(x, weight[:, cols], bias)``,  x (..., k),      out (..., N)
    Indices are assumed valid (see ``validate_indices``); only metadata is checked here.
    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors).
    """
    idx, form = check_linear_args(x, weight, bias, rows, cols)
    return linear_unchecked(x, weight, bias, idx, form == "rows", resolve_backend(backend, x))


def gathered_glu(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    activation: str = "silu",
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``act(F.linear(x, Wg[rows], bg[rows])) * F.linear(x, Wu[rows], bu[rows])`` in one kernel.

    x: (..., K); gate_weight, up_weight: (N, K); rows: (n,) int32/int64 -> out (..., n).
    activation: "silu", "gelu" (erf), "gelu_tanh", "relu" (or transformers' aliases such as
    "gelu_pytorch_tanh" / "gelu_new").
    """
    check_glu_args(x, gate_weight, up_weight, rows, gate_bias, up_bias)
    activation = canonical_activation(activation)
    return glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, rows, activation, resolve_backend(backend, x))


def _row_mask(x: torch.Tensor, member: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """x: (..., U) with each row's entries outside its own group's list set to 0."""
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 * member.index_select(0, groups.row_groups)).reshape(x.shape)


def segmented_linear_unchecked(x, weight, bias, grouped: GroupedIndices, groups: TokenGroups, rows: bool, path: str,
                               backend: str) -> torch.Tensor:
    """``segmented_linear`` after its checks: ``path`` resolved by ``choose_path``, ``backend``
    resolved ("triton" or "torch")."""
    if path == "single":
        g = groups.active[0] if groups.active else 0
        if grouped.is_dense(g):
            return F.linear(x, weight, bias)
        return linear_unchecked(x, weight, bias, grouped.group(g), rows, backend)
    if path == "union":
        ids, member = grouped.union(groups.active)
        return linear_unchecked(x if rows else _row_mask(x, member, groups), weight, bias, ids, rows, backend)
    width = grouped.width(groups.active)
    if backend == "torch":
        return segmented_linear_ref(x, weight, bias, grouped.table, groups.table, rows=rows, width=width)
    from doe_kernels.ops.segmented_linear_kernel import segmented_linear_call

    return segmented_linear_call(x, weight, bias, grouped.table, groups.table, rows, width, len(groups.active),
                               groups.max_rows)


def segmented_glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, grouped: GroupedIndices,
                            groups: TokenGroups, activation: str, path: str, backend: str) -> torch.Tensor:
    """``segmented_glu`` after its checks: ``activation`` canonical, ``path`` and ``backend``
    resolved."""
    if path == "single":
        g = groups.active[0] if groups.active else 0
        if grouped.is_dense(g):
            return activation_fn(activation)(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)
        return glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, grouped.group(g), activation, backend)
    if path == "union":
        ids = grouped.union(groups.active)[0]
        return glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, ids, activation, backend)
    width = grouped.width(groups.active)
    if backend == "torch":
        return segmented_glu_ref(x, gate_weight, up_weight, grouped.table, groups.table, width=width,
                                 activation=activation, gate_bias=gate_bias, up_bias=up_bias)
    from doe_kernels.ops.segmented_glu_kernel import segmented_glu_call

    return segmented_glu_call(x, gate_weight, up_weight, gate_bias, up_bias, grouped.table, groups.table, activation,
                            width, len(groups.active), groups.max_rows)


def segmented_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    rows: Optional[GroupedIndices] = None,
    cols: Optional[GroupedIndices] = None,
    groups: TokenGroups,
    path: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """``gathered_linear`` for a batch whose rows use different kept-neuron lists, in one launch.

    x: (..., K), M rows; weight: (N, K_full), any strides; bias: (N,) or None. groups: the
    group of each of the M rows (``TokenGroups``). Exactly one of
      rows: ``GroupedIndices`` of the output neurons -> out (..., width), row m (group g)
            holding ``F.linear(x[m], weight[idx_g], bias[idx_g])`` in its first k_g columns;
      cols: ``GroupedIndices`` of the input neurons, x (..., width) as the rows form wrote it
            -> out (..., N), row m = ``F.linear(x[m, :k_g], weight[:, idx_g], bias)``.
    path: see ``choose_path``; it fixes the layout of h (x of the cols form), so a rows gather
    and the cols gather that reads its output must resolve to the same path ("auto" does for
    the same ``groups`` and lists). On "union", h's columns are the union's neurons and the
    cols form ignores those outside each row's list; elsewhere width = ``mixed_width``.
    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors).
    """
    if (rows is None) == (cols is None):
        raise ValueError("segmented_linear: expected exactly one of rows= or cols= (a GroupedIndices), got "
                         f"{'both' if rows is not None else 'neither'}")
    grouped = rows if rows is not None else cols
    path = choose_path(grouped, groups, path)
    check_segmented_args(x, weight, bias, grouped, groups, rows is not None, mixed_width(grouped, groups, path))
    return segmented_linear_unchecked(x, weight, bias, grouped, groups, rows is not None, path,
                                      resolve_backend(backend, x))


def segmented_glu(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    rows: GroupedIndices,
    groups: TokenGroups,
    activation: str = "silu",
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    path: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """``gathered_glu`` for a batch whose rows use different kept-neuron lists, in one launch.

    x: (..., K); gate_weight, up_weight: (N, K); rows: ``GroupedIndices``; groups: ``TokenGroups``
    -> out (..., width) laid out as ``segmented_linear``'s rows form on the same path.
    """
    path = choose_path(rows, groups, path)
    check_segmented_glu_args(x, gate_weight, up_weight, gate_bias, up_bias, rows, groups)
    activation = canonical_activation(activation)
    return segmented_glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, rows, groups, activation, path,
                                   resolve_backend(backend, x))
