"""Segmented fused GLU: ``gathered_glu`` for a batch whose rows use different kept-neuron lists.

    y[m, :k_g] = act(x[m] @ Wg[idx_g]^T + bg[idx_g]) * (x[m] @ Wu[idx_g]^T + bu[idx_g]),  y[m, k_g:] = 0

for the rows m of group g; y: (M, width), width the largest k_g among groups with rows. Tiles,
row table and padding as in ``segmented_linear``; the epilogue as in ``gathered_glu``.
The backward w.r.t. x recomputes g and u with the segmented linear kernel and applies two
segmented cols gathers on the transposed weights. Registered as
``torch.ops.doe_kernels.segmented_glu`` (fake implementation, autograd).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._activations import ACTIVATION_IDS
from doe_kernels.ops._config import INTERPRET, autotune_configs, dot_precision, m_bucket, make_pruner, op_not_needed
from doe_kernels.ops.gathered_glu_kernel import glu_tile
from doe_kernels.ops.segmented_linear_kernel import row_tiles, segment_tile, segmented_linear_op, width_bucket
from doe_kernels.reference import activation_fn, activation_grad, canonical_activation

__all__ = ["segmented_glu_mm", "segmented_glu_op"]


@triton.autotune(
    configs=autotune_configs("seg-glu"),
    key=["M_BUCKET", "N_KEY", "K", "stride_wn", "stride_wk"],
    prune_configs_by={"early_config_prune": make_pruner(weights=2)},
)
@triton.jit
def _segmented_glu_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, idx_ptr, rows_ptr, y_ptr,
    M, N, K, G, ACTIVE, M_BUCKET, N_KEY,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_un, stride_uk,
    stride_ym, stride_yn,
    HAS_BIAS_G: tl.constexpr,
    HAS_BIAS_U: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, mask_m, live, pid_n, i0, kept = segment_tile(tl.program_id(0), M, N, ACTIVE, rows_ptr, idx_ptr, G,
                                                       BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < kept
    rn = tl.load(idx_ptr + i0 + offs_n, mask=mask_n, other=0).to(tl.int64)
    k_end = tl.where((pid_n * BLOCK_N < kept) & live, K, 0)
    x_rows = x_ptr + rows[:, None] * stride_xm
    g_cols = wg_ptr + rn[None, :] * stride_wn
    u_cols = wu_ptr + rn[None, :] * stride_un
    h = glu_tile(x_rows, g_cols, u_cols, bg_ptr, bu_ptr, y_ptr, rn, k_end, mask_m, mask_n, stride_xk, stride_wk,
                 stride_uk, HAS_BIAS_G, HAS_BIAS_U, ACT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


def segmented_glu_mm(
    x: torch.Tensor,
    wg: torch.Tensor,
    wu: torch.Tensor,
    table: torch.Tensor,
    rows_table: torch.Tensor,
    *,
    width: int,
    activation: str,
    bg: Optional[torch.Tensor] = None,
    bu: Optional[torch.Tensor] = None,
    active: int,
    max_rows: int,
) -> torch.Tensor:
    """Launch the fused kernel on 2-D operands. Inputs are assumed checked.

    x: (M, K); wg, wu: (N_full, K), any strides; table / rows_table as in ``segmented_mm``
    -> out (M, width), zero beyond each row's k_g.
    """
    M, K = x.shape
    y = torch.empty((M, width), device=x.device, dtype=x.dtype)
    if M == 0 or width == 0:
        return y
    if K == 0:
        from doe_kernels.reference import segmented_glu_ref

        return y.copy_(segmented_glu_ref(x, wg, wu, table, rows_table, width=width, activation=activation,
                                         gate_bias=bg, up_bias=bu))
    G = rows_table.numel() - M - 1

    def grid(meta):
        return (row_tiles(M, active, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    _segmented_glu_kernel[grid](
        x, wg, wu, bg if bg is not None else wg, bu if bu is not None else wu, table, rows_table, y,
        M, width, K, G, active, m_bucket(max_rows), width_bucket(width),
        x.stride(0), x.stride(1),
        wg.stride(0), wg.stride(1),
        wu.stride(0), wu.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS_G=bg is not None,
        HAS_BIAS_U=bu is not None,
        ACT=ACTIVATION_IDS[canonical_activation(activation)],
        UPCAST=INTERPRET,
        PRECISION=dot_precision(x.dtype),
    )
    return y


def segmented_glu_nd(x, gate_weight, up_weight, gate_bias, up_bias, table, rows_table, activation: str, width: int,
                     active: int, max_rows: int) -> torch.Tensor:
    """The fused segmented Triton GLU on x: (..., K) -> (..., width)."""
    y = segmented_glu_mm(x.reshape(-1, x.shape[-1]), gate_weight, up_weight, table, rows_table, width=width,
                         activation=activation, bg=gate_bias, bu=up_bias, active=active, max_rows=max_rows)
    return y.reshape(*x.shape[:-1], width)


def segmented_glu_call(x, gate_weight, up_weight, gate_bias, up_bias, table, rows_table, activation: str, width: int,
                       active: int, max_rows: int) -> torch.Tensor:
    """``segmented_glu_nd`` through the registered op where autograd or tracing need it."""
    args = (x, gate_weight, up_weight, gate_bias, up_bias, table, rows_table, activation, width, active, max_rows)
    if op_not_needed(x, gate_weight, up_weight, gate_bias, up_bias):
        return segmented_glu_nd(*args)
    return segmented_glu_op(*args)


@torch.library.custom_op("doe_kernels::segmented_glu", mutates_args=())
def segmented_glu_op(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, gate_bias: Optional[torch.Tensor],
    up_bias: Optional[torch.Tensor], table: torch.Tensor, rows_table: torch.Tensor, activation: str, width: int,
    active: int, max_rows: int,
) -> torch.Tensor:
    """``segmented_glu_nd`` as a torch op (autograd, torch.compile, fake tensors)."""
    return segmented_glu_nd(x, gate_weight, up_weight, gate_bias, up_bias, table, rows_table, activation, width,
                            active, max_rows)


@segmented_glu_op.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias, table, rows_table, activation, width, active, max_rows):
    return x.new_empty((*x.shape[:-1], width))


def _setup_context(ctx, inputs, output):
    x, wg, wu, bg, bu, table, rows_table, activation, width, active, max_rows = inputs
    ctx.args = (activation, width, active, max_rows)
    ctx.save_for_backward(x, wg, wu, bg, bu, table, rows_table)


def _backward(ctx, dy):
    """dx through the segmented kernels; weight and bias grads (DoE keeps weights frozen)
    through the reference."""
    x, wg, wu, bg, bu, table, rows_table = ctx.saved_tensors
    activation, width, active, max_rows = ctx.args
    grads = [None] * 11
    if ctx.needs_input_grad[0]:
        meta = (table, rows_table, True, width, active, max_rows)
        g = segmented_linear_op(x, wg, bg, *meta).float()
        u = segmented_linear_op(x, wu, bu, *meta).float()
        d = dy.float()
        dg = (d * u * activation_grad(activation, g)).to(dy.dtype)
        du = (d * activation_fn(activation)(g)).to(dy.dtype)
        back = (table, rows_table, False, x.shape[-1], active, max_rows)
        grads[0] = segmented_linear_op(dg, wg.t(), None, *back) + segmented_linear_op(du, wu.t(), None, *back)
    params = [(i, t) for i, t in ((1, wg), (2, wu), (3, bg), (4, bu)) if t is not None and ctx.needs_input_grad[i]]
    if params:
        from doe_kernels.reference import segmented_glu_ref

        with torch.enable_grad():
            leaves = {i: t.detach().requires_grad_() for i, t in params}
            pick = [leaves.get(i, t) for i, t in ((1, wg), (2, wu), (3, bg), (4, bu))]
            y = segmented_glu_ref(x.detach(), pick[0], pick[1], table, rows_table, width=width, activation=activation,
                                  gate_bias=pick[2], up_bias=pick[3])
            for (i, _), grad in zip(params, torch.autograd.grad(y, list(leaves.values()), dy)):
                grads[i] = grad
    return tuple(grads)


segmented_glu_op.register_autograd(_backward, setup_context=_setup_context)
