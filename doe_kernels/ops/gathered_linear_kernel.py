"""Gathered linear: ``F.linear`` on the kept rows or columns of a weight, without copying it.

One kernel serves both forms and both directions of autograd. It computes

    y[m, n] = sum_k x[m, k] * w[rn(n), rk(k)]  (+ bias[rn(n)])

on a 2-D strided view ``w`` of shape (N_full, K_full), where either the output axis is
gathered (``rn(n) = idx[n]``, a rows gather) or the reduction axis is (``rk(k) = idx[k]``, a
cols gather). The weight is read through its strides, so a neuron-major (transposed-view)
weight and GPT-2's Conv1D (a transposed view of its (in, out) weight) need no copy.

    rows forward    y  = x  @ W[idx]^T      rows on W
    rows backward   dx = dy @ W[idx]        cols on W^T
    cols forward    y  = h  @ W[:, idx]^T   cols on W
    cols backward   dh = dy @ W[:, idx]     rows on W^T

The op is registered as ``torch.ops.doe_kernels.gathered_linear`` (a fake implementation for
tracing, autograd for the input and, when asked, the weight and bias), so torch.compile
traces it without a graph break and CUDA graphs can capture it: the launcher never reads
device memory on the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from doe_kernels.ops._config import (
    INTERPRET,
    autotune_configs,
    dot_precision,
    launcher,
    m_bucket,
    op_not_needed,
    prune_configs,
)
from doe_kernels.ops.gathered_gemv_kernel import GEMV_MAX_M, gathered_gemv, prepare_linear, sum_partials

__all__ = ["gathered_mm", "gather_then_mm", "grouped_tile", "gathered_dot", "gathered_linear_call", "gathered_linear_nd",
           "gathered_linear_op"]


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


@triton.jit
def gathered_dot(x_rows, w_cols, idx_ptr, k_first, k_end, k_step, mask_m, mask_n, stride_xk, stride_wk,
                 ROWS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) tile sum_k x[m, k] * w[rk(k), n] over k in [k_first, k_end),
    BLOCK_K at a time every k_step: x_rows (BLOCK_M, 1) row pointers, w_cols (1, BLOCK_N) neuron
    pointers; rk(k) = k for a rows gather (ROWS), idx[k] for a cols gather."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_first, k_end, k_step):
        ks = k0 + offs_k
        mask_k = ks < k_end
        if ROWS:
            rk = ks.to(tl.int64)
        else:
            rk = tl.load(idx_ptr + ks, mask=mask_k, other=0).to(tl.int64)
        a = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + rk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=autotune_configs(),
    key=["M_BUCKET", "N", "K", "stride_wn", "stride_wk", "ROWS", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _gathered_mm_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ys, stride_ym, stride_yn,
    ROWS: tl.constexpr,
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
    if ROWS:
        rn = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    else:
        rn = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + rn[None, :] * stride_wn
    acc = gathered_dot(x_rows, w_cols, idx_ptr, pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K, mask_m, mask_n,
                       stride_xk, stride_wk, ROWS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gathered_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
    path: str = "auto",
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """Launch the gathered GEMM on 2-D operands. Inputs are assumed checked.

    x: (M, K); w: (N_full, K_full), any strides; exactly one of
      rows: (n,) int32/int64, K == K_full -> out (M, n)      = x @ w[rows]^T (+ bias[rows])
      cols: (k,) int32/int64, K == k      -> out (M, N_full) = x @ w[:, cols]^T (+ bias)
    path: "gemv" (``gathered_gemv``), "dot" (``tl.dot`` tiles), "gather" (``gather_then_mm``)
    or "auto" (gemv for M <= GEMV_MAX_M, else dot). split_k: None chooses by problem size.
    config: the launch config of the chosen path's kernel instead of autotuning (tuning sweeps).
    """
    if path == "gather":
        return gather_then_mm(x, w, rows=rows, cols=cols, bias=bias)
    if path == "gemv" or (path == "auto" and x.shape[0] <= GEMV_MAX_M):
        return gathered_gemv(x, w, rows=rows, cols=cols, bias=bias, split_k=split_k, config=config)
    y, out, idx, split_k = prepare_linear(x, w, rows, cols, bias, split_k)
    if not split_k:
        return y
    is_rows = rows is not None
    (M, K), N = x.shape, y.shape[1]
    stride_ys = 0 if split_k == 1 else out.stride(0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    kernel, meta = launcher(_gathered_mm_kernel, config)
    kernel[grid](
        x, w, bias if bias is not None else w, idx, out,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        stride_ys, out.stride(-2), out.stride(-1),
        ROWS=is_rows,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        UPCAST=INTERPRET,
        PRECISION=dot_precision(x.dtype),
        **meta,
    )
    return y if split_k == 1 else sum_partials(out, y)


def gathered_linear_nd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
                       rows: bool) -> torch.Tensor:
    """The Triton gathered linear on x: (..., K) -> (..., n) (rows) or (..., N) (cols)."""
    x2 = x.reshape(-1, x.shape[-1])
    if rows:
        y = gathered_mm(x2, weight, rows=idx, bias=bias)
    else:
        y = gathered_mm(x2, weight, cols=idx, bias=bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def gathered_linear_call(x, weight, bias, idx, rows: bool) -> torch.Tensor:
    """``gathered_linear_nd`` through the registered op where autograd or tracing need it."""
    if op_not_needed(x, weight, bias):
        return gathered_linear_nd(x, weight, bias, idx, rows)
    return gathered_linear_op(x, weight, bias, idx, rows)


def gather_then_mm(x: torch.Tensor, w: torch.Tensor, *, rows: Optional[torch.Tensor] = None,
                   cols: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gathered_mm`` as a copy, then ``F.linear`` (cuBLAS on a GPU): the kept rows (or columns)
    copied into a zero-padded buffer whose kept width is a multiple of 16 (and, for a cols
    gather, x into one as wide), so that cuBLAS runs its aligned kernels; at large M the copy
    costs a few percent of the GEMM. Same arguments and result as ``gathered_mm``.
    """
    idx = rows if rows is not None else cols
    n = idx.numel()
    pad = -(-n // 16) * 16
    if rows is not None:
        buf = w.new_zeros((pad, w.shape[1]))
        torch.index_select(w, 0, idx, out=buf[:n])
        b = None
        if bias is not None:
            b = bias.new_zeros(pad)
            torch.index_select(bias, 0, idx, out=b[:n])
        return F.linear(x, buf, b)[:, :n].contiguous()
    buf = w.new_zeros((pad, w.shape[0]))  # the kept columns as rows: w[:, idx].T, (pad, N)
    torch.index_select(w.t(), 0, idx, out=buf[:n])
    xp = x.new_zeros((x.shape[0], pad))
    xp[:, :n] = x
    return F.linear(xp, buf.t(), bias)


@torch.library.custom_op("doe_kernels::gathered_linear", mutates_args=())
def gathered_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor, rows: bool
) -> torch.Tensor:
    """``gathered_linear_nd`` as a torch op (autograd, torch.compile, fake tensors)."""
    return gathered_linear_nd(x, weight, bias, idx, rows)


@gathered_linear_op.register_fake
def _(x, weight, bias, idx, rows):
    return x.new_empty((*x.shape[:-1], idx.shape[0] if rows else weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, idx, rows = inputs
    ctx.rows = rows
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x if weight.requires_grad else None, weight, idx)


def _backward(ctx, dy):
    """x grad through the kernel (rows <-> cols on the transposed weight); weight and bias grads,
    rarely needed since DoE keeps weights frozen, through plain PyTorch."""
    x, weight, idx = ctx.saved_tensors
    rows = ctx.rows
    dx = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        dx = gathered_linear_op(dy, weight.t(), None, idx, not rows)
    dy2 = dy.reshape(-1, dy.shape[-1])
    if ctx.needs_input_grad[1]:
        part = dy2.t().to(weight.dtype) @ x.reshape(-1, x.shape[-1])
        dweight = torch.zeros_like(weight).index_add(0 if rows else 1, idx.long(), part)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        colsum = dy2.sum(0)
        if rows:
            dbias = torch.zeros(weight.shape[0], device=dy.device, dtype=dy.dtype).index_add(0, idx.long(), colsum)
        else:
            dbias = colsum
    return dx, dweight, dbias, None, None


gathered_linear_op.register_autograd(_backward, setup_context=_setup_context)
