"""Segmented gathered linear: one launch for a batch whose rows use different kept-neuron lists.

Rows of x belong to groups (``doe_kernels.segments.TokenGroups``); group g keeps the neurons
``idx_g`` (``GroupedIndices``). With ``rows(g)`` the rows of group g and k_g = len(idx_g):

    rows  y[m, :k_g] = x[m] @ W[idx_g]^T (+ b[idx_g]),  y[m, k_g:] = 0     y: (M, width)
    cols  y[m]       = h[m, :k_g] @ W[:, idx_g]^T (+ b)                  h: (M, width)

``width`` is the largest k_g among the groups with rows: h is padded per row with zeros and
the cols form reads only each row's first k_g columns, so the padding never contributes.
Rows are not moved: a tile of BLOCK_M rows of one group reads their ids from the row table
(as vLLM's fused_moe reads its sorted token ids) and writes results in place. Each program
finds its group by scanning the G group sizes (G is small), so no tile table depends on
BLOCK_M and the host builds the metadata once per batch, whatever the autotuner picks.

The backward w.r.t. x swaps the forms on the transposed weight, as in ``gathered_linear``.
Registered as ``torch.ops.doe_kernels.segmented_linear`` (fake implementation, autograd).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._config import INTERPRET, autotune_configs, dot_precision, m_bucket, op_not_needed, prune_segmented
from doe_kernels.ops.gathered_linear_kernel import gathered_dot, grouped_tile

__all__ = ["segment_tile", "segmented_mm", "segmented_linear_call", "segmented_linear_nd", "segmented_linear_op",
           "width_bucket"]


def width_bucket(width: int) -> int:
    """The autotune key of a padded width: the next power of two (one tuning per bucket, not
    per expert size)."""
    return triton.next_power_of_2(max(width, 1))


@triton.jit
def segment_tile(pid, M, N, ACTIVE, rows_ptr, idx_ptr, G, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """What program ``pid`` computes: (rows, mask_m, live, pid_n, start, kept). rows: the
    (BLOCK_M,) int64 ids of its rows of x (mask_m: which are real), all of one group; live:
    it has any; pid_n: its output tile; group's kept ids at idx_ptr + start, ``kept`` of them.
    Row tiles run group after group, each group's rows cut into ceil(n_g / BLOCK_M) tiles (see
    ``row_tiles``); a tile past the last has no rows."""
    tiles_m = tl.cdiv(M, BLOCK_M) + ACTIVE
    pid_m, pid_n = grouped_tile(pid, tiles_m * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    group = pid_m * 0
    first = pid_m * 0
    end = pid_m * 0
    tiles = pid_m * 0
    for g in range(G):
        r0 = tl.load(rows_ptr + g)
        r1 = tl.load(rows_ptr + g + 1)
        n = tl.cdiv(r1 - r0, BLOCK_M)
        hit = (pid_m >= tiles) & (pid_m < tiles + n)
        group = tl.where(hit, g, group)
        first = tl.where(hit, r0 + (pid_m - tiles) * BLOCK_M, first)
        end = tl.where(hit, r1, end)
        tiles += n
    start = tl.load(idx_ptr + group)
    kept = tl.load(idx_ptr + group + 1) - start
    offs_r = first + tl.arange(0, BLOCK_M)
    mask_m = offs_r < end
    rows = tl.load(rows_ptr + offs_r, mask=mask_m, other=0).to(tl.int64)
    return rows, mask_m, first < end, pid_n, start, kept


@triton.autotune(
    configs=autotune_configs("seg"),
    key=["M_BUCKET", "N_KEY", "K_KEY", "stride_wn", "stride_wk", "ROWS"],
    prune_configs_by={"early_config_prune": prune_segmented},
)
@triton.jit
def _segmented_mm_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, rows_ptr, y_ptr,
    M, N, K, G, ACTIVE, M_BUCKET, N_KEY, K_KEY,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # N: output features (rows: the padded width), K: reduction (cols: the padded width).
    # ACTIVE: groups with rows; each may end in a partial tile (see row_tiles).
    rows, mask_m, live, pid_n, i0, kept = segment_tile(tl.program_id(0), M, N, ACTIVE, rows_ptr, idx_ptr, G,
                                                       BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROWS:
        mask_n = offs_n < kept
        rn = tl.load(idx_ptr + i0 + offs_n, mask=mask_n, other=0).to(tl.int64)
        # a tile wholly in the row's padding (or without rows) only writes zeros
        k_end = tl.where((pid_n * BLOCK_N < kept) & live, K, 0)
    else:
        mask_n = offs_n < N
        rn = offs_n.to(tl.int64)
        k_end = tl.where(live, kept, 0)
    x_rows = x_ptr + rows[:, None] * stride_xm
    w_cols = w_ptr + rn[None, :] * stride_wn
    acc = gathered_dot(x_rows, w_cols, idx_ptr + i0, 0, k_end, BLOCK_K, mask_m, mask_n, stride_xk, stride_wk,
                       ROWS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


def row_tiles(num_rows: int, active: int, block_m: int) -> int:
    """Row tiles to launch: enough for every group's last partial tile."""
    return triton.cdiv(num_rows, block_m) + active


def segmented_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    table: torch.Tensor,
    rows_table: torch.Tensor,
    *,
    rows: bool,
    width: int,
    bias: Optional[torch.Tensor] = None,
    active: int,
    max_rows: int,
) -> torch.Tensor:
    """Launch the segmented GEMM on 2-D operands. Inputs are assumed checked.

    x: (M, K); w: (N_full, K_full), any strides; table: a ``GroupedIndices.table`` of G
    groups; rows_table: a ``TokenGroups.table`` of the same G groups over M rows.
      rows=True:  K == K_full -> out (M, width), zero beyond each row's k_g
      rows=False: K == width  -> out (M, N_full)
    active: groups with rows; max_rows: rows of the largest group (tile-size bucket).
    """
    M = x.shape[0]
    G = rows_table.numel() - M - 1
    N = width if rows else w.shape[0]
    K = x.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y

    def grid(meta):
        return (row_tiles(M, active, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _segmented_mm_kernel[grid](
        x, w, bias if bias is not None else w, table, rows_table, y,
        M, N, K, G, active, m_bucket(max_rows),
        N if not rows else width_bucket(N), width_bucket(K) if not rows else K,
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        y.stride(0), y.stride(1),
        ROWS=rows,
        HAS_BIAS=bias is not None,
        UPCAST=INTERPRET,
        PRECISION=dot_precision(x.dtype),
    )
    return y


def segmented_linear_nd(x, weight, bias, table, rows_table, rows: bool, width: int, active: int,
                        max_rows: int) -> torch.Tensor:
    """The Triton segmented linear on x: (..., K) -> (..., width) (rows) or (..., N) (cols)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = segmented_mm(x2, weight, table, rows_table, rows=rows, width=width, bias=bias, active=active,
                     max_rows=max_rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def segmented_linear_call(x, weight, bias, table, rows_table, rows: bool, width: int, active: int,
                          max_rows: int) -> torch.Tensor:
    """``segmented_linear_nd`` through the registered op where autograd or tracing need it."""
    if op_not_needed(x, weight, bias):
        return segmented_linear_nd(x, weight, bias, table, rows_table, rows, width, active, max_rows)
    return segmented_linear_op(x, weight, bias, table, rows_table, rows, width, active, max_rows)


@torch.library.custom_op("doe_kernels::segmented_linear", mutates_args=())
def segmented_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], table: torch.Tensor,
    rows_table: torch.Tensor, rows: bool, width: int, active: int, max_rows: int,
) -> torch.Tensor:
    """``segmented_linear_nd`` as a torch op (autograd, torch.compile, fake tensors)."""
    return segmented_linear_nd(x, weight, bias, table, rows_table, rows, width, active, max_rows)


@segmented_linear_op.register_fake
def _(x, weight, bias, table, rows_table, rows, width, active, max_rows):
    return x.new_empty((*x.shape[:-1], width if rows else weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, table, rows_table, rows, width, active, max_rows = inputs
    ctx.args = (rows, width, active, max_rows)
    ctx.save_for_backward(x, weight, bias, table, rows_table)


def _backward(ctx, dy):
    """x grad through the kernel (rows <-> cols on the transposed weight); weight and bias
    grads, which DoE never needs (weights stay frozen), through the reference."""
    x, weight, bias, table, rows_table = ctx.saved_tensors
    rows, width, active, max_rows = ctx.args
    dx = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        dx = segmented_linear_op(dy, weight.t(), None, table, rows_table, not rows, x.shape[-1], active, max_rows)
    if ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]):
        from doe_kernels.reference import segmented_linear_ref

        with torch.enable_grad():
            w = weight.detach().requires_grad_()
            b = bias.detach().requires_grad_() if bias is not None else None
            y = segmented_linear_ref(x.detach(), w, b, table, rows_table, rows=rows, width=width)
            grads = torch.autograd.grad(y, [w] + ([b] if b is not None else []), dy)
        dweight = grads[0] if ctx.needs_input_grad[1] else None
        dbias = grads[1] if b is not None and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None, None, None, None, None, None


segmented_linear_op.register_autograd(_backward, setup_context=_setup_context)
