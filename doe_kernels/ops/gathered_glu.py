"""Fused gathered GLU: ``act(x @ Wg[idx]^T + bg[idx]) * (x @ Wu[idx]^T + bu[idx])``.

One kernel for the gate and up projections of LLaMA / Mistral / Qwen2 / Gemma / gated T5:
each x tile is loaded once and multiplied with the kept rows of both weights, and the
activation and product happen in registers, so neither g nor u goes to memory.

The backward w.r.t. x recomputes g and u with the gathered linear kernel and applies two
"gather k" GEMMs (dx = dg @ Wg[idx] + du @ Wu[idx]); nothing but x is saved.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._config import INTERPRET, autotune_configs, dot_precision, m_bucket, make_pruner
from doe_kernels.ops.gathered_linear import gathered_mm, grouped_tile
from doe_kernels.reference import activation_fn, canonical_activation

__all__ = ["gathered_glu_mm", "GatheredGLUFunction", "ACTIVATION_IDS"]

#: Activation ids understood by the kernel (a constexpr selects the branch).
ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _apply_activation(g, ACT: tl.constexpr):
    if ACT == 0:
        out = g * tl.sigmoid(g)
    elif ACT == 1:
        out = 0.5 * g * (1.0 + tl.math.erf(g * _SQRT_HALF))
    elif ACT == 2:
        # tanh(z) = 2 * sigmoid(2z) - 1; |z| <= 20 already gives tanh = +-1 in fp32.
        inner = tl.minimum(tl.maximum(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g), -20.0), 20.0)
        out = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    else:
        out = tl.maximum(g, 0.0)
    return out


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
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    g_cols = wg_ptr + rn[None, :] * stride_wn
    u_cols = wu_ptr + rn[None, :] * stride_un

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
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
    # Round g and u to the storage dtype first, as the unfused module computes them.
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
    h = _apply_activation(g, ACT) * u
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gathered_glu_mm(
    x: torch.Tensor,
    wg: torch.Tensor,
    wu: torch.Tensor,
    idx: torch.Tensor,
    activation: str,
    bg: Optional[torch.Tensor] = None,
    bu: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel on 2-D operands. Inputs are assumed checked.

    x: (M, K); wg, wu: (N_full, K), any strides; idx: (n,) -> out (M, n).
    """
    M, K = x.shape
    N = idx.numel()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        g = torch.zeros((M, N), device=x.device, dtype=x.dtype) if bg is None else bg[idx].expand(M, N)
        u = torch.zeros((M, N), device=x.device, dtype=x.dtype) if bu is None else bu[idx].expand(M, N)
        return y.copy_(activation_fn(activation)(g) * u)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _gathered_glu_kernel[grid](
        x, wg, wu, bg if bg is not None else wg, bu if bu is not None else wu, idx, y,
        M, N, K, m_bucket(M),
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


class GatheredGLUFunction(torch.autograd.Function):
    """Autograd for the fused Triton path: dx through the gathered kernels; weight and bias
    grads (DoE keeps weights frozen) through plain PyTorch on the recomputed g and u."""

    @staticmethod
    def forward(ctx, x, wg, wu, bg, bu, idx, activation: str):
        lead = x.shape[:-1]
        y = gathered_glu_mm(x.reshape(-1, x.shape[-1]), wg, wu, idx, activation, bg, bu)
        ctx.activation = activation
        ctx.save_for_backward(x, wg, wu, bg, bu, idx)
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, wg, wu, bg, bu, idx = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = gathered_mm(x2, wg, idx, gather="n", bias=bg)
        u = gathered_mm(x2, wu, idx, gather="n", bias=bu)
        with torch.enable_grad():
            g32 = g.float().requires_grad_()
            a = activation_fn(ctx.activation)(g32)
            (dg,) = torch.autograd.grad(a, g32, dy2.float() * u.float())
        dg = dg.to(dy.dtype)
        du = (dy2.float() * a.detach()).to(dy.dtype)
        grads = [None] * 7
        if ctx.needs_input_grad[0]:
            dx = gathered_mm(dg, wg.t(), idx, gather="k") + gathered_mm(du, wu.t(), idx, gather="k")
            grads[0] = dx.reshape(*dy.shape[:-1], dx.shape[-1])
        long_idx = idx.long()
        for pos, (w, d) in ((1, (wg, dg)), (2, (wu, du))):
            if ctx.needs_input_grad[pos]:
                grads[pos] = torch.zeros_like(w).index_add_(0, long_idx, d.t().to(w.dtype) @ x2)
        for pos, (b, d) in ((3, (bg, dg)), (4, (bu, du))):
            if b is not None and ctx.needs_input_grad[pos]:
                grads[pos] = torch.zeros_like(b).index_add_(0, long_idx, d.sum(0).to(b.dtype))
        return tuple(grads)
