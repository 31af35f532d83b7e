"""Decode-sized gathered linear (M <= GEMV_MAX_M): broadcast-multiply + ``tl.sum`` instead of ``tl.dot``.

At a handful of rows a ``tl.dot`` tile (BLOCK_M >= 16) wastes most of its MMA work and the
problem is bound by reading the kept weights once. Here each program owns BLOCK_N outputs and
one K range, reads each (BLOCK_K, BLOCK_N) weight tile once (16-byte vectors along whichever
axis is contiguous: K for the rows gather on a row-major weight, N for the cols gather on a
neuron-major one), streams it past the L2 (``evict_first``), and applies it to every row of x,
which stays cached (``evict_last``). Same math and same forms as ``gathered_linear``:

    rows  y[m, n] = sum_k x[m, k] * w[idx[n], k]   (+ b[idx[n]])
    cols  y[m, n] = sum_j x[m, j] * w[n, idx[j]]   (+ b[n])

Split-K (few output tiles for the GPU) writes fp32 partials that one small kernel sums and
casts: no atomics, so bf16 works everywhere, and nothing is read back on the host.

Tuning constants. Tiles hold 8K-16K weight elements (64-128 per thread at 4-8 warps, 16-byte
vectors), the range decode GEMV kernels use; shapes from wide-N (neuron-major down projection)
to wide-K (row-major up projection). GEMV_MAX_M = 8: above it the fp32 FMAs of 16 rows cost
about as much as reading the weights on an H100 (by arithmetic, not yet measured; the kernel
benchmarks time both paths at M = 1..16).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from doe_kernels.ops._config import ONE_CONFIG, launcher, resolve_split_k

__all__ = ["GEMV_MAX_M", "gathered_gemv", "gemv_configs"]

GEMV_MAX_M = 8

# (BLOCK_N, BLOCK_K, num_warps, num_stages, forms: "r" rows gather, "c" cols gather). From an
# H200 sweep on the LLaMA-7B FFN at M = 1 (CUDA-graph replays): the rows gather (K contiguous)
# is fastest with few, long rows per tile and no split (the fused GLU at 8x512: 1.15x the copy
# floor); the cols gather (N contiguous on the neuron-major weight) with 64 outputs (128-byte
# rows) by 256 kept neurons, split-K 8. Tiles with 128+ outputs or short K ran 1.3-30x slower.
_GEMV = [
    (8, 512, 8, 2, "r"),
    (8, 512, 4, 2, "r"),
    (16, 256, 8, 2, "r"),
    (16, 512, 8, 2, "r"),
    (32, 256, 4, 2, "rc"),
    (64, 128, 4, 2, "rc"),
    (64, 256, 4, 2, "c"),
    (64, 256, 8, 2, "c"),
    (128, 128, 4, 2, "c"),
]
#: Weight elements per thread when kept neurons are strided columns (rows gather on a weight
#: stored (in, out), GPT-2's c_fc as stored): each element is a separate load with its own
#: 64-bit address, and the compile audit saw larger tiles spill.
STRIDED_ELEMS_PER_THREAD = 32
_INTERPRETER = [(32, 32, 4, 1, "rc")]


def gemv_configs(rows=None) -> list:
    """triton.Configs of (BLOCK_N, BLOCK_K, num_warps, num_stages[, forms]) rows; ``forms``
    ("r", "c" or "rc", default both) is kept as ``config.forms`` for the pruner."""
    rows = rows if rows is not None else (_INTERPRETER if ONE_CONFIG else _GEMV)
    out = []
    for bn, bk, w, s, *forms in rows:
        c = triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        c.forms = forms[0] if forms else "rc"
        out.append(c)
    return out


def prune_gemv_configs(configs, named_args, **kwargs):
    """The configs meant for the form (rows or cols gather); small tiles only when the gathered
    neurons are not contiguous (see STRIDED_ELEMS_PER_THREAD)."""
    if len(configs) <= 1:
        return configs
    rows = bool(kwargs.get("ROWS", named_args.get("ROWS")))
    configs = [c for c in configs if ("r" if rows else "c") in getattr(c, "forms", "rc")] or configs
    if not rows or named_args["stride_wk"] == 1:
        return configs
    small = [c for c in configs
             if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= STRIDED_ELEMS_PER_THREAD * 32 * c.num_warps]
    return small or configs


def gemv_block_m(m: int) -> int:
    """The rows one program handles: M rounded up to a power of two (one compile per bucket)."""
    return triton.next_power_of_2(max(m, 1))


@triton.jit
def k_range(pid_k, K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[start, end) of split ``pid_k``: contiguous chunks, a multiple of BLOCK_K long."""
    if SPLIT_K == 1:
        return 0, K
    chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    start = pid_k * chunk
    return start, tl.minimum(K, start + chunk)


@triton.jit
def _sum_partials_kernel(p_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = sum_s p[s, i] for contiguous fp32 partials p: (SPLIT_K, MN) and y: (MN,)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=gemv_configs(),
    key=["BLOCK_M", "N", "K", "stride_wn", "stride_wk", "ROWS", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_gemv_configs},
)
@triton.jit
def _gathered_gemv_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ys, stride_ym, stride_yn,
    ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if ROWS:
        rn = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    else:
        rn = offs_n.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + rn[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_end = k_range(pid_k, K, SPLIT_K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_end
        if ROWS:
            rk = ks.to(tl.int64)
        else:
            rk = tl.load(idx_ptr + ks, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(w_cols + rk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            xm = tl.load(x_ptr + m * stride_xm + ks * stride_xk, mask=mask_k & (offs_k * 0 + m < M), other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            part = tl.sum(w * xm[:, None], axis=0)
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


def sum_partials(partials: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = partials.sum(0) cast to y's dtype, in one launch. partials: contiguous (S, *y.shape) fp32."""
    mn = y.numel()
    block = 1024
    _sum_partials_kernel[(triton.cdiv(mn, block),)](partials, y, mn, SPLIT_K=partials.shape[0], BLOCK=block)
    return y


def prepare_linear(x, w, rows, cols, bias, split_k, fill: str = "dot"):
    """The prologue both gathered-linear launchers share (``fill``: see ``SPLIT_FILL``).

    Returns (y, out, idx, split_k): y (M, N) the result; out where the kernel writes (y, or fp32
    partials (split_k, M, N)); split_k 0 when y is already complete (M, N or K is zero).
    """
    is_rows = rows is not None
    idx = rows if is_rows else cols
    M, K = x.shape
    N = idx.numel() if is_rows else w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y, y, idx, 0
    if K == 0:
        y = y.zero_() if bias is None else y.copy_((bias[idx] if is_rows else bias).expand(M, N))
        return y, y, idx, 0
    split_k = resolve_split_k(split_k, M, N, K, x.device, fill)
    out = y if split_k == 1 else torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    return y, out, idx, split_k


def gathered_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """The GEMV form of ``gathered_mm`` (same arguments and result) for small M.

    x: (M, K); w: (N_full, K_full), any strides; rows: (n,) -> out (M, n); cols: (k,) -> out (M, N_full).
    config: BLOCK_N, BLOCK_K, num_warps, num_stages to launch with instead of autotuning.
    """
    is_rows = rows is not None
    y, out, idx, split_k = prepare_linear(x, w, rows, cols, bias, split_k, "gemv-rows" if is_rows else "gemv-cols")
    if not split_k:
        return y
    (M, K), N = x.shape, y.shape[1]

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), split_k)

    kernel, meta = launcher(_gathered_gemv_kernel, config)
    kernel[grid](
        x, w, bias if bias is not None else w, idx, out,
        M, N, K,
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        0 if split_k == 1 else out.stride(0), out.stride(-2), out.stride(-1),
        ROWS=is_rows,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        BLOCK_M=gemv_block_m(M),
        **meta,
    )
    return y if split_k == 1 else sum_partials(out, y)
