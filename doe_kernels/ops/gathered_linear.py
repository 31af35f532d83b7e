"""Gathered linear: ``F.linear`` on the kept rows or columns of a weight, without copying it.

One kernel serves both forms and both directions of autograd. It computes

    y[m, n] = sum_k x[m, k] * w[rn(n), rk(k)]  (+ bias[rn(n)])

on a 2-D strided view ``w`` of shape (N_full, K_full), where either the output axis is
gathered (``rn(n) = idx[n]``, "gather n") or the reduction axis is (``rk(k) = idx[k]``,
"gather k"). The weight is read through its strides, so a neuron-major (transposed-view)
weight and GPT-2's Conv1D (a transposed view of its (in, out) weight) need no copy.

    rows forward    y  = x  @ W[idx]^T      gather n on W
    rows backward   dx = dy @ W[idx]        gather k on W^T
    cols forward    y  = h  @ W[:, idx]^T   gather k on W
    cols backward   dh = dy @ W[:, idx]     gather n on W^T
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._config import (
    INTERPRET,
    autotune_configs,
    dot_precision,
    m_bucket,
    prune_configs,
    split_k_for,
)

__all__ = ["gathered_mm", "grouped_tile", "GatheredLinearFunction"]


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped launch order: GROUP_M row-tiles in a row
    share each weight tile while it sits in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.autotune(
    configs=autotune_configs(),
    key=["M_BUCKET", "N", "K", "stride_wn", "stride_wk", "GATHER_N", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _gathered_mm_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ys, stride_ym, stride_yn,
    GATHER_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATHER_N:
        rn = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    else:
        rn = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + rn[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        ks = k0 + offs_k
        mask_k = ks < K
        if GATHER_N:
            rk = ks.to(tl.int64)
        else:
            rk = tl.load(idx_ptr + ks, mask=mask_k, other=0).to(tl.int64)
        a = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + rk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gathered_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    gather: str,
    bias: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """Launch the gathered GEMM on 2-D operands. Inputs are assumed checked.

    x: (M, K); w: (N_full, K_full), any strides; idx: (n,) int32/int64.
    gather="n": K == K_full, out (M, n) = x @ w[idx]^T (+ bias[idx]).
    gather="k": K == n,      out (M, N_full) = x @ w[:, idx]^T (+ bias).
    """
    gather_n = gather == "n"
    M, K = x.shape
    N = idx.numel() if gather_n else w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_((bias[idx] if gather_n else bias).expand(M, N))
    if split_k is None:
        split_k = split_k_for(M, N, K, x.device)
    split_k = max(1, min(split_k, triton.cdiv(K, 16)))
    out = y if split_k == 1 else torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    stride_ys = 0 if split_k == 1 else out.stride(0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    _gathered_mm_kernel[grid](
        x, w, bias if bias is not None else w, idx, out,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        stride_ys, out.stride(-2), out.stride(-1),
        GATHER_N=gather_n,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        UPCAST=INTERPRET,
        PRECISION=dot_precision(x.dtype),
    )
    if split_k > 1:
        y.copy_(out.sum(0))
    return y


class GatheredLinearFunction(torch.autograd.Function):
    """Autograd for the Triton path. x grad uses the kernel (rows <-> cols); weight and bias
    grads, rarely needed since DoE keeps weights frozen, use plain PyTorch."""

    @staticmethod
    def forward(ctx, x, weight, bias, idx, rows: bool):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = gathered_mm(x2, weight, idx, gather="n" if rows else "k", bias=bias)
        ctx.rows = rows
        ctx.save_for_backward(x if weight.requires_grad else None, weight, idx)
        ctx.has_bias = bias is not None
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, idx = ctx.saved_tensors
        rows = ctx.rows
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = gathered_mm(dy2, weight.t(), idx, gather="k" if rows else "n")
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            part = dy2.t().to(weight.dtype) @ x2
            dweight = torch.zeros_like(weight)
            if rows:
                dweight.index_add_(0, idx.long(), part)
            else:
                dweight.index_add_(1, idx.long(), part)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            colsum = dy2.sum(0)
            if rows:
                dbias = torch.zeros(weight.shape[0], device=dy.device, dtype=dy.dtype)
                dbias.index_add_(0, idx.long(), colsum)
            else:
                dbias = colsum
        return dx, dweight, dbias, None, None
