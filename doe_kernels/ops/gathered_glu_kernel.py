"""Fused gathered GLU: ``act(x @ Wg[idx]^T + bg[idx]) * (x @ Wu[idx]^T + bu[idx])``.

One kernel for the gate and up projections of LLaMA / Mistral / Qwen2 / Gemma / gated T5:
each x tile is loaded once and multiplied with the kept rows of both weights, and the
activation and product happen in registers, so neither g nor u goes to memory.

The backward w.r.t. x recomputes g and u with the gathered linear kernel and applies two
cols gathers on the transposed weights (dx = dg @ Wg[idx] + du @ Wu[idx]); nothing but x is
saved. Registered as ``torch.ops.doe_kernels.gathered_glu`` (fake implementation, autograd).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._activations import ACTIVATION_IDS, apply_activation
from doe_kernels.ops._config import (
    INTERPRET,
    autotune_configs,
    dot_precision,
    launcher,
    m_bucket,
    make_pruner,
    op_not_needed,
)
from doe_kernels.ops.gathered_gemv_kernel import GEMV_MAX_M
from doe_kernels.ops.gathered_glu_gemv_kernel import gathered_glu_gemv
from doe_kernels.ops.gathered_linear_kernel import gathered_linear_op, grouped_tile
from doe_kernels.reference import activation_fn, activation_grad, canonical_activation

__all__ = ["gathered_glu_mm", "gathered_glu_op", "glu_tile", "ACTIVATION_IDS"]


@triton.jit
def glu_tile(x_rows, g_cols, u_cols, bg_ptr, bu_ptr, y_ptr, rn, k_end, mask_m, mask_n, stride_xk, stride_wk,
             stride_uk, HAS_BIAS_G: tl.constexpr, HAS_BIAS_U: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) tile act(x @ Wg^T + bg) * (x @ Wu^T + bu) over k in [0, k_end):
    x_rows (BLOCK_M, 1) row pointers, g_cols / u_cols (1, BLOCK_N) neuron pointers, rn the
    neurons (bias offsets); g and u are rounded to y's dtype first, as the unfused module does."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_end
        a = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        bg = tl.load(g_cols + ks[:, None].to(tl.int64) * stride_wk, mask=w_mask, other=0.0)
        bu = tl.load(u_cols + ks[:, None].to(tl.int64) * stride_uk, mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    if HAS_BIAS_G:
        acc_g += tl.load(bg_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS_U:
        acc_u += tl.load(bu_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
    return apply_activation(g, ACT) * u


@triton.autotune(
    configs=autotune_configs("glu"),
    key=["M_BUCKET", "N", "K", "stride_wn", "stride_wk"],
    prune_configs_by={"early_config_prune": make_pruner(weights=2)},
)
@triton.jit
def _gathered_glu_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, idx_ptr, y_ptr,
    M, N, K, M_BUCKET,
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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rn = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    g_cols = wg_ptr + rn[None, :] * stride_wn
    u_cols = wu_ptr + rn[None, :] * stride_un
    h = glu_tile(x_rows, g_cols, u_cols, bg_ptr, bu_ptr, y_ptr, rn, K, mask_m, mask_n, stride_xk, stride_wk,
                 stride_uk, HAS_BIAS_G, HAS_BIAS_U, ACT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gathered_glu_mm(
    x: torch.Tensor,
    wg: torch.Tensor,
    wu: torch.Tensor,
    *,
    rows: torch.Tensor,
    activation: str,
    bg: Optional[torch.Tensor] = None,
    bu: Optional[torch.Tensor] = None,
    path: str = "auto",
    split_k: Optional[int] = None,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """Launch the fused kernel on 2-D operands. Inputs are assumed checked.

    x: (M, K); wg, wu: (N_full, K), any strides; rows: (n,) -> out (M, n).
    path: "gemv" (broadcast-multiply form), "dot" (``tl.dot`` tiles) or "auto" (gemv for
    M <= GEMV_MAX_M). split_k: GEMV only (None: by problem size). config: the launch config of
    the chosen path's kernel instead of autotuning (tuning sweeps).
    """
    idx = rows
    M, K = x.shape
    N = idx.numel()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        g = torch.zeros((M, N), device=x.device, dtype=x.dtype) if bg is None else bg[idx].expand(M, N)
        u = torch.zeros((M, N), device=x.device, dtype=x.dtype) if bu is None else bu[idx].expand(M, N)
        return y.copy_(activation_fn(activation)(g) * u)
    act_id = ACTIVATION_IDS[canonical_activation(activation)]
    if path == "gemv" or (path == "auto" and M <= GEMV_MAX_M):
        return gathered_glu_gemv(x, wg, wu, rows=idx, act_id=act_id, bg=bg, bu=bu, split_k=split_k, config=config)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel, meta = launcher(_gathered_glu_kernel, config)
    kernel[grid](
        x, wg, wu, bg if bg is not None else wg, bu if bu is not None else wu, idx, y,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1),
        wg.stride(0), wg.stride(1),
        wu.stride(0), wu.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS_G=bg is not None,
        HAS_BIAS_U=bu is not None,
        ACT=act_id,
        UPCAST=INTERPRET,
        PRECISION=dot_precision(x.dtype),
        **meta,
    )
    return y


def gathered_glu_nd(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation: str) -> torch.Tensor:
    """The fused Triton GLU on x: (..., K) -> (..., n)."""
    y = gathered_glu_mm(x.reshape(-1, x.shape[-1]), gate_weight, up_weight, rows=idx, activation=activation,
                        bg=gate_bias, bu=up_bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def gathered_glu_call(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation: str) -> torch.Tensor:
    """``gathered_glu_nd`` through the registered op where autograd or tracing need it."""
    if op_not_needed(x, gate_weight, up_weight, gate_bias, up_bias):
        return gathered_glu_nd(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation)
    return gathered_glu_op(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation)


@torch.library.custom_op("doe_kernels::gathered_glu", mutates_args=())
def gathered_glu_op(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    gate_bias: Optional[torch.Tensor],
    up_bias: Optional[torch.Tensor],
    idx: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """``gathered_glu_nd`` as a torch op (autograd, torch.compile, fake tensors)."""
    return gathered_glu_nd(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation)


@gathered_glu_op.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation):
    return x.new_empty((*x.shape[:-1], idx.shape[0]))


def _setup_context(ctx, inputs, output):
    x, wg, wu, bg, bu, idx, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, wg, wu, bg, bu, idx)


def _backward(ctx, dy):
    """dx through the gathered kernels; weight and bias grads (DoE keeps weights frozen)
    through plain PyTorch on the recomputed g and u."""
    x, wg, wu, bg, bu, idx = ctx.saved_tensors
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1]).float()
    g = gathered_linear_op(x2, wg, bg, idx, True).float()
    u = gathered_linear_op(x2, wu, bu, idx, True).float()
    dg = (dy2 * u * activation_grad(ctx.activation, g)).to(dy.dtype)
    du = (dy2 * activation_fn(ctx.activation)(g)).to(dy.dtype)
    grads = [None] * 7
    if ctx.needs_input_grad[0]:
        dx = gathered_linear_op(dg, wg.t(), None, idx, False) + gathered_linear_op(du, wu.t(), None, idx, False)
        grads[0] = dx.reshape(*dy.shape[:-1], dx.shape[-1])
    long_idx = idx.long()
    for pos, (w, d) in ((1, (wg, dg)), (2, (wu, du))):
        if ctx.needs_input_grad[pos]:
            grads[pos] = torch.zeros_like(w).index_add(0, long_idx, d.t().to(w.dtype) @ x2)
    for pos, (b, d) in ((3, (bg, dg)), (4, (bu, du))):
        if b is not None and ctx.needs_input_grad[pos]:
            grads[pos] = torch.zeros_like(b).index_add(0, long_idx, d.sum(0).to(b.dtype))
    return tuple(grads)


gathered_glu_op.register_autograd(_backward, setup_context=_setup_context)
