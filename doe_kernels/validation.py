"""Input checks.

Two levels: ``validate_indices`` checks values (range, order, duplicates). It reads the
index tensor, which on a GPU means a device sync, so callers run it once when an expert is
built or installed. ``check_*`` functions look only at metadata (shapes, dtypes, devices) and
run on every op call. ``linear_args_ok`` / ``glu_args_ok`` are their fast forms for indices
that ``validate_indices`` already turned into a 1-D int32 tensor: one boolean, no messages
(callers run the ``check_*`` function when it is False, for the error).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["validate_indices", "INDEX_DTYPES", "stale_weight_error"]

INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def validate_indices(indices, size: int, *, name: str = "indices") -> torch.Tensor:
    """Check a neuron index list and return it as a contiguous int32 tensor (same device).

    indices: 1-D integer tensor (or sequence of ints) of kept neuron ids; must be non-empty,
    sorted ascending, unique, and in [0, size). Raises ValueError / TypeError naming the
    first offending value.
    """
    if not isinstance(indices, torch.Tensor):
        try:
            indices = torch.as_tensor(list(indices))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: expected a 1-D integer tensor, got {type(indices).__name__}") from exc
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64 indices, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(indices.shape)}")
    n = indices.numel()
    if n == 0:
        raise ValueError(f"{name}: expected at least one kept neuron out of {size}, got an empty index list")
    if n > size:
        raise ValueError(f"{name}: {n} indices for only {size} neurons")
    host = indices.detach().to("cpu", torch.int64)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: index {bad} out of range, expected values in [0, {size})")
    if n > 1:
        step = host[1:] - host[:-1]
        if bool((step == 0).any()):
            pos = int((step == 0).nonzero()[0])
            raise ValueError(f"{name}: duplicated index {int(host[pos])} at position {pos + 1}")
        if bool((step < 0).any()):
            pos = int((step < 0).nonzero()[0])
            raise ValueError(
                f"{name}: expected indices sorted ascending, got {int(host[pos])} before {int(host[pos + 1])} "
                f"at position {pos + 1} (sort them first, e.g. torch.sort)"
            )
    return indices.to(dtype=torch.int32).contiguous()


def _check_index(idx: torch.Tensor, device: torch.device, name: str) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int32/int64 indices, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64 indices, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D index tensor, got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name}: expected indices on {device} (the weight's device), got {idx.device}")


def _check_weight_and_input(x: torch.Tensor, weight: torch.Tensor, wname: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{wname}: expected a 2-D (out_features, in_features) weight, got {_describe(weight)}")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension (..., features), got a 0-d tensor")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but {wname} is on {weight.device}: move them to one device")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but {wname} is {weight.dtype}: cast one to the other's dtype")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")


def _check_bias(bias: Optional[torch.Tensor], weight: torch.Tensor, size: int, name: str) -> None:
    if bias is None:
        return
    if bias.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},), got {tuple(bias.shape)}")
    if bias.device != weight.device or bias.dtype != weight.dtype:
        raise TypeError(
            f"{name}: expected {weight.dtype} on {weight.device} like the weight, got {bias.dtype} on {bias.device}"
        )


def check_linear_args(x, weight, bias, rows, cols) -> tuple[torch.Tensor, str]:
    """Metadata checks of gathered_linear; returns (index, "rows" or "cols")."""
    if (rows is None) == (cols is None):
        raise ValueError(
            "gathered_linear: expected exactly one of rows= (gather output neurons) or cols= "
            f"(gather input neurons), got {'both' if rows is not None else 'neither'}"
        )
    _check_weight_and_input(x, weight, "weight")
    form = "rows" if rows is not None else "cols"
    idx = rows if rows is not None else cols
    is_rows = form == "rows"
    _check_index(idx, weight.device, form)
    n_out, n_in = weight.shape
    expected_in = n_in if is_rows else idx.shape[0]
    if x.shape[-1] != expected_in:
        what = f"weight.shape[1] = {n_in}" if is_rows else f"len(cols) = {idx.shape[0]}"
        raise ValueError(f"x: expected last dimension {expected_in} ({what}), got shape {tuple(x.shape)}")
    if not is_rows and idx.shape[0] > n_in:
        raise ValueError(f"cols: {idx.shape[0]} indices for a weight with only {n_in} input features")
    if is_rows and idx.shape[0] > n_out:
        raise ValueError(f"rows: {idx.shape[0]} indices for a weight with only {n_out} output features")
    _check_bias(bias, weight, n_out, "bias")
    return idx, form


def check_glu_args(x, gate_weight, up_weight, rows, gate_bias, up_bias) -> None:
    """Metadata checks of gathered_glu."""
    _check_weight_and_input(x, gate_weight, "gate_weight")
    _check_weight_and_input(x, up_weight, "up_weight")
    if gate_weight.shape != up_weight.shape:
        raise ValueError(
            f"gate_weight and up_weight must have one shape, got {tuple(gate_weight.shape)} and {tuple(up_weight.shape)}"
        )
    _check_index(rows, gate_weight.device, "rows")
    n_out, n_in = gate_weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x: expected last dimension {n_in} (gate_weight.shape[1]), got shape {tuple(x.shape)}")
    if rows.shape[0] > n_out:
        raise ValueError(f"rows: {rows.shape[0]} indices for a weight with only {n_out} output features")
    _check_bias(gate_bias, gate_weight, n_out, "gate_bias")
    _check_bias(up_bias, up_weight, n_out, "up_bias")


def _bias_ok(bias: Optional[torch.Tensor], weight: torch.Tensor, size: int) -> bool:
    return bias is None or (
        bias.shape == (size,) and bias.dtype == weight.dtype and bias.device == weight.device
    )


def linear_args_ok(x, weight, bias, idx, rows: bool, total: int) -> bool:
    """True when ``check_linear_args`` would pass and ``weight`` still has ``total`` neurons on
    the gathered axis (the bound ``idx`` was validated against). ``idx``: 1-D int32."""
    if weight.dim() != 2 or x.dim() == 0:
        return False
    n_out, n_in = weight.shape
    device = weight.device
    return (
        x.dtype == weight.dtype
        and x.dtype.is_floating_point
        and x.device == device
        and idx.device == device
        and (n_out if rows else n_in) == total
        and x.shape[-1] == (n_in if rows else idx.shape[0])
        and _bias_ok(bias, weight, n_out)
    )


def glu_args_ok(x, gate_weight, up_weight, gate_bias, up_bias, idx, total: int) -> bool:
    """True when ``check_glu_args`` would pass and the weights still have ``total`` rows (the
    bound ``idx`` was validated against). ``idx``: 1-D int32."""
    return (linear_args_ok(x, gate_weight, gate_bias, idx, True, total)
            and linear_args_ok(x, up_weight, up_bias, idx, True, total))


def check_segmented_args(x, weight, bias, grouped, groups, rows: bool, width: int, wname: str = "weight") -> None:
    """Metadata checks of the segmented ops: ``grouped`` (a ``GroupedIndices``) indexes
    ``weight``'s gathered axis on its device, ``groups`` (a ``TokenGroups``) has one group id
    per row of x for the same groups, and x's last dimension is K (rows) or ``width`` (cols)."""
    _check_weight_and_input(x, weight, wname)
    n_out, n_in = weight.shape
    total = n_out if rows else n_in
    if grouped.total != total:
        raise ValueError(f"{'rows' if rows else 'cols'}: groups index {grouped.total} neurons, {wname} has {total} "
                         f"on the gathered axis ({tuple(weight.shape)})")
    if grouped.device != weight.device or groups.table.device != weight.device:
        raise ValueError(f"group tables on {grouped.device} and {groups.table.device}, expected {weight.device} "
                         f"(the {wname}'s device)")
    if groups.num_groups != grouped.num_groups:
        raise ValueError(f"groups: row groups are over {groups.num_groups} groups, the index lists over "
                         f"{grouped.num_groups}")
    m = x.numel() // x.shape[-1] if x.shape[-1] else math.prod(x.shape[:-1])
    if groups.num_rows != m:
        raise ValueError(f"groups: expected one group per row of x ({m} rows), got {groups.num_rows}")
    expected = n_in if rows else width
    if x.shape[-1] != expected:
        what = f"{wname}.shape[1]" if rows else "the width of the rows gather for these groups"
        raise ValueError(f"x: expected last dimension {expected} ({what}), got shape {tuple(x.shape)}")
    _check_bias(bias, weight, n_out, "bias")


def check_segmented_glu_args(x, gate_weight, up_weight, gate_bias, up_bias, grouped, groups) -> None:
    """``check_segmented_args`` for the gate and the up projection of a segmented GLU."""
    for w, b, name in ((gate_weight, gate_bias, "gate_weight"), (up_weight, up_bias, "up_weight")):
        check_segmented_args(x, w, b, grouped, groups, True, 0, name)


def stale_weight_error(name: str, total: int, weight: torch.Tensor) -> ValueError:
    """The error of a wrapper whose weight changed shape since its ids were validated."""
    return ValueError(
        f"{name}: validated against {total} neurons, but the weight is now {tuple(weight.shape)}; "
        "call set_indices with ids for the new weight"
    )
