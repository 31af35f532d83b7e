"""Decode-sized fused gathered GLU (M <= GEMV_MAX_M): ``act(x @ Wg[idx]^T + bg) * (x @ Wu[idx]^T + bu)``.

The GEMV form of ``gathered_glu``: each program reads BLOCK_N kept rows of both weights once
(16-byte vectors along K, ``evict_first``) and applies them to every row of x (``evict_last``).
Without split-K the activation and product happen in registers; with split-K the fp32 partials
of g and u go to a scratch buffer and one small kernel sums them and applies the epilogue.

Tuning constants: the rows-gather tiles of the linear GEMV at up to half its weight elements
(two weights per tile); on an H200 (LLaMA-7B gate/up at M = 1, keep 0.35) 8x512 at 8 warps
without split read the kept rows at 1.15x the copy floor, 64x64 (the widest) 1.3-13x slower.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._activations import apply_activation
from doe_kernels.ops._config import ONE_CONFIG, launcher, resolve_split_k
from doe_kernels.ops.gathered_gemv_kernel import gemv_block_m, k_range

__all__ = ["gathered_glu_gemv", "glu_gemv_configs"]

# (BLOCK_N, BLOCK_K, num_warps, num_stages)
_GLU_GEMV = [
    (8, 512, 8, 2),
    (8, 512, 4, 2),
    (16, 256, 8, 2),
    (16, 256, 4, 2),
    (32, 256, 8, 2),
]
_INTERPRETER = [(32, 32, 4, 1)]


def glu_gemv_configs(rows=None) -> list:
    rows = rows if rows is not None else (_INTERPRETER if ONE_CONFIG else _GLU_GEMV)
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in rows]


@triton.autotune(configs=glu_gemv_configs(), key=["BLOCK_M", "N", "K", "stride_wn", "stride_wk", "SPLIT_K"])
@triton.jit
def _gathered_glu_gemv_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, idx_ptr, y_ptr, p_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_un, stride_uk,
    stride_ym, stride_yn,
    HAS_BIAS_G: tl.constexpr,
    HAS_BIAS_U: tl.constexpr,
    ACT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rn = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    g_cols = wg_ptr + rn[None, :] * stride_wn
    u_cols = wu_ptr + rn[None, :] * stride_un

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_end = k_range(pid_k, K, SPLIT_K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_end
        w_mask = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(g_cols + ks[:, None].to(tl.int64) * stride_wk, mask=w_mask, other=0.0,
                     eviction_policy="evict_first").to(tl.float32)
        wu = tl.load(u_cols + ks[:, None].to(tl.int64) * stride_uk, mask=w_mask, other=0.0,
                     eviction_policy="evict_first").to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            xm = tl.load(x_ptr + m * stride_xm + ks * stride_xk, mask=mask_k & (offs_k * 0 + m < M), other=0.0,
                         eviction_policy="evict_last").to(tl.float32)[:, None]
            row = offs_m[:, None] == m
            acc_g += tl.where(row, tl.sum(wg * xm, axis=0)[None, :], 0.0)
            acc_u += tl.where(row, tl.sum(wu * xm, axis=0)[None, :], 0.0)

    if pid_k == 0:
        if HAS_BIAS_G:
            acc_g += tl.load(bg_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS_U:
            acc_u += tl.load(bu_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
        h = apply_activation(g, ACT) * u
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, h.to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        # partials: contiguous fp32 (SPLIT_K, 2, M, N)
        p = p_ptr + pid_k * 2 * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(p, acc_g, mask=mask)
        tl.store(p + M * N, acc_u, mask=mask)


@triton.jit
def _glu_sum_partials_kernel(p_ptr, y_ptr, MN, ACT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(sum_s g_s) * sum_s u_s for contiguous fp32 partials (SPLIT_K, 2, MN); y: (MN,)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        g += tl.load(p_ptr + s * 2 * MN + offs, mask=mask, other=0.0)
        u += tl.load(p_ptr + (s * 2 + 1) * MN + offs, mask=mask, other=0.0)
    g = g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (apply_activation(g, ACT) * u).to(y_ptr.dtype.element_ty), mask=mask)


def gathered_glu_gemv(
    x: torch.Tensor,
    wg: torch.Tensor,
    wu: torch.Tensor,
    *,
    rows: torch.Tensor,
    act_id: int,
    bg: Optional[torch.Tensor] = None,
    bu: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """The GEMV form of ``gathered_glu_mm`` for small M; x: (M, K) with K > 0 -> out (M, n).
    config: BLOCK_N, BLOCK_K, num_warps, num_stages to launch with instead of autotuning."""
    M, K = x.shape
    N = rows.numel()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    split_k = resolve_split_k(split_k, M, N, K, x.device, "gemv-rows")
    partials = y if split_k == 1 else torch.empty((split_k, 2, M, N), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), split_k)

    kernel, meta = launcher(_gathered_glu_gemv_kernel, config)
    kernel[grid](
        x, wg, wu, bg if bg is not None else wg, bu if bu is not None else wu, rows, y, partials,
        M, N, K,
        x.stride(0), x.stride(1),
        wg.stride(0), wg.stride(1),
        wu.stride(0), wu.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS_G=bg is not None,
        HAS_BIAS_U=bu is not None,
        ACT=act_id,
        SPLIT_K=split_k,
        BLOCK_M=gemv_block_m(M),
        **meta,
    )
    if split_k > 1:
        block = 1024
        _glu_sum_partials_kernel[(triton.cdiv(M * N, block),)](partials, y, M * N, ACT=act_id, SPLIT_K=split_k,
                                                               BLOCK=block)
    return y
