"""Launch configuration shared by the gathered kernels.

Tuning constants. Where they come from: the large-M tiles are the ones Triton's matmul
tutorial autotunes over for Hopper/Ampere (128x128x64, 128x256x64, 64x128x64 ...), the
small-M (decode) tiles keep BLOCK_M at 16 (the smallest ``tl.dot`` tile the GPU backend
compiles) and spend the threads on N and K instead, as decode GEMV kernels do. The fused GLU
holds two fp32 accumulators, so its tiles are half the size of the linear ones at the same
warp count; the compile audit (``doe_kernels.ops.audit``: registers, spills, shared memory on
sm_90 and sm_80) chose them. An H200 sweep (``benchmarks.tune_kernels``, LLaMA-7B FFN, bf16)
added the deeper-pipelined Hopper tiles: the up projection's best tile 128x256x64 at 4 stages
(1.21x cuBLAS on a sliced copy padded to 16 at M = 2048, 1.36x at 8192), the fused GLU's
128x128x32 at 5 stages (1.06x and 1.10x cuBLAS's two GEMMs plus SiLU-and-multiply).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from doe_kernels.env import env_flag, interpreting

#: True when kernels run on CPU tensors through Triton's interpreter (CI).
INTERPRET = interpreting()
#: One small config per kernel instead of autotuning: always under the interpreter, and on a
#: GPU when DOE_KERNELS_AUTOTUNE=0 (read at import), which compiles each kernel once instead of
#: once per candidate config: correct results fast (tests), not the fastest kernels.
ONE_CONFIG = INTERPRET or not env_flag("DOE_KERNELS_AUTOTUNE", default=True)

#: M is bucketed to the next power of two (capped) so that autotuning runs once per bucket,
#: not once per sequence length.
MAX_M_BUCKET = 4096

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, lowest sm]). The audit found
# 256x128 (w8) and 128x128 (w4) spilling on the neuron-major cols gather, and 128x256 spilling
# on sm_80 (mma.sync keeps its operands in registers; sm_90's wgmma reads them from shared memory).
_LARGE_M = [
    (128, 128, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4, 90),
    (128, 256, 64, 8, 8, 3, 90),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
]
_MID_M = [
    (64, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (32, 64, 64, 8, 4, 4),
    (32, 128, 64, 8, 4, 4),
]
_SMALL_M = [
    (16, 32, 128, 1, 4, 4),
    (16, 64, 64, 1, 4, 4),
    (16, 64, 128, 1, 4, 4),
    (16, 64, 256, 1, 4, 3),
    (16, 128, 64, 1, 4, 4),
    (16, 128, 128, 1, 4, 3),
]
# Fused GLU: two (BLOCK_M, BLOCK_N) fp32 accumulators must fit in the registers of
# 32 * num_warps threads (2 * 128 * 128 / 256 = 128 per thread at most), and two weight tiles
# per stage in shared memory.
_GLU_LARGE_M = [
    (128, 128, 32, 8, 8, 5, 90),
    (128, 128, 64, 8, 8, 4, 90),
    (128, 128, 64, 8, 8, 3, 90),
    (128, 64, 64, 8, 8, 4),
    (64, 128, 64, 8, 8, 4),
    (64, 64, 64, 8, 4, 4),
]
_GLU_MID_M = [
    (64, 64, 64, 8, 4, 4),
    (32, 64, 64, 8, 4, 4),
    (32, 128, 64, 8, 4, 4),
]
_GLU_SMALL_M = _SMALL_M
#: The interpreter cannot autotune (no driver) and is slow: one small config, every dim >= 16
#: (also the ONE_CONFIG config on a GPU).
_INTERPRETER = [(16, 32, 32, 4, 4, 1)]

#: Shared memory one block may use (bytes, opt-in maximum) by compute capability major version,
#: for targets without a device to ask (the compile audit).
SMEM_LIMIT = {9: 232448, 8: 166912}


def _configs(rows) -> list[triton.Config]:
    out = []
    for bm, bn, bk, gm, w, s, *lowest in dict.fromkeys(rows):
        c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}, num_warps=w, num_stages=s)
        c.min_arch = lowest[0] if lowest else 0  # compute capability * 10 the config is meant for
        out.append(c)
    return out


#: The segmented (mixed-batch) kernels address x through a row table, one 64-bit address per
#: row: the audit saw these tiles spill there (the linear 128x256 in every form, the GLU's
#: 128x128), and, when kept neurons are strided columns (Conv1D as stored), every tile wider
#: than 64 neurons or holding more than 8K weight elements (on sm_80).
_SEG_SPILLS = {"seg": {(128, 256)}, "seg-glu": {(128, 128)}}
_SEG_STRIDED_MAX_N, _SEG_STRIDED_MAX_TILE = 64, 8192


def gpu_configs(kernel: str) -> list[triton.Config]:
    """Every config a GPU autotunes over for ``kernel`` ("linear", "glu", "seg" or "seg-glu")."""
    rows = _GLU_SMALL_M + _GLU_MID_M + _GLU_LARGE_M if kernel in ("glu", "seg-glu") else _SMALL_M + _MID_M + _LARGE_M
    drop = _SEG_SPILLS.get(kernel, set())
    return _configs([r for r in rows if (r[0], r[1]) not in drop])


def fits_strided(config: triton.Config, rows: bool, stride_wk: int) -> bool:
    """False for a segmented tile too big for a rows gather whose kept neurons are strided
    columns (stride_wk != 1)."""
    kw = config.kwargs
    return (not rows or stride_wk == 1
            or (kw["BLOCK_N"] <= _SEG_STRIDED_MAX_N and kw["BLOCK_N"] * kw["BLOCK_K"] <= _SEG_STRIDED_MAX_TILE))


def prune_segmented(configs, named_args, **kwargs):
    """``prune_configs``, then ``fits_strided``."""
    configs = prune_configs(configs, named_args, **kwargs)
    if len(configs) <= 1:
        return configs
    rows = kwargs.get("ROWS", named_args.get("ROWS", True))
    return [c for c in configs if fits_strided(c, rows, named_args["stride_wk"])] or configs


def autotune_configs(kernel: str = "linear") -> list[triton.Config]:
    if ONE_CONFIG:
        return _configs(_INTERPRETER)
    return gpu_configs(kernel)


def smem_bytes(config: triton.Config, elem_size: int, weights: int = 1, arch: int = 90) -> int:
    """Upper bound of the shared memory the software pipeline allocates: one x tile and
    ``weights`` weight tiles per buffered stage; num_stages buffers on sm_90, one fewer on
    sm_8x (what Triton allocates for these kernels; the audit checks the bound)."""
    kw = config.kwargs
    stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + weights * kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_size
    buffers = config.num_stages if arch >= 90 else config.num_stages - 1
    return max(1, buffers) * stage


def fits_bucket(config: triton.Config, m_bucket: int) -> bool:
    """Decode tiles for M <= 16, mid tiles up to 64, big tiles beyond."""
    bm = config.kwargs["BLOCK_M"]
    if m_bucket <= 16:
        return bm == 16
    if m_bucket <= 64:
        return bm in (32, 64)
    return bm >= 64


def select_configs(configs, m_bucket: int, elem_size: int, weights: int, arch=None, smem_limit=None) -> list:
    """The configs to try: those meant for the target (arch: capability * 10, None if unknown)
    that fit its shared memory (bytes, None if unknown) and the M bucket. Falls back to the
    target's configs whatever the bucket, then to every config."""
    if arch is not None:
        configs = [c for c in configs if getattr(c, "min_arch", 0) <= arch] or configs
        if smem_limit is not None:
            configs = [c for c in configs if smem_bytes(c, elem_size, weights, arch) <= smem_limit] or configs
    return [c for c in configs if fits_bucket(c, m_bucket)] or configs


def make_pruner(weights: int):
    """An ``early_config_prune`` for a kernel that streams ``weights`` weight tiles per stage."""

    def prune(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        x = named_args["x_ptr"]
        arch = limit = None
        if x.device.type == "cuda":
            arch, limit = device_limits(x.device)
        return select_configs(configs, named_args["M_BUCKET"], x.element_size(), weights, arch, limit)

    prune.weights = weights
    return prune


prune_configs = make_pruner(1)


def device_limits(device: torch.device) -> tuple:
    """(capability * 10, shared memory bytes per block) of a CUDA device."""
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple:
    major, minor = torch.cuda.get_device_capability(index)
    try:
        from triton.runtime import driver

        smem = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover - the driver API differs between versions; torch knows it too
        smem = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
        smem = int(smem) if smem else SMEM_LIMIT.get(major)
    return major * 10 + minor, smem


def launcher(kernel, config: Optional[triton.Config]) -> tuple:
    """(what to launch, its extra keyword arguments): the autotuned ``kernel`` itself, or, for a
    given ``config``, its JIT function with that config's meta-parameters and launch settings
    (tuning sweeps; nothing is cached or autotuned)."""
    if config is None:
        return kernel, {}
    return kernel.fn, dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def op_not_needed(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a launcher may run without its registered custom op: eager (torch.compile is
    not tracing, no dispatch mode is active), plain tensors, and no gradient to record. The op's
    dispatcher entry and output checks cost host time on every call, which an eager decoding
    loop pays dozens of times per token; CUDA-graph capture needs no op either."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), MAX_M_BUCKET)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch, so the kernel matches what F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


#: How a split-K launcher fills the GPU: (narrowest output tile of its configs, programs per
#: SM to aim for, largest split). The GEMV forms (H200 sweep, LLaMA-7B FFN at M = 1): the
#: rows gather runs best on 8-wide tiles with no split (482 programs), the cols gather on
#: 64-wide tiles split 8 ways (13.3 us, 4.7 us less than split 4 and 30 us less than none).
SPLIT_FILL = {"dot": (64, 2, 8), "gemv-rows": (8, 4, 16), "gemv-cols": (64, 4, 16)}


def resolve_split_k(split_k: Optional[int], m: int, n: int, k: int, device: torch.device, fill: str = "dot") -> int:
    """The split-K factor a launcher uses: ``split_k`` (None: ``split_k_for`` with the ``fill``
    of :data:`SPLIT_FILL`), at most one K slice per 16 columns and at least 1."""
    if split_k is None:
        split_k = split_k_for(m, n, k, device, *SPLIT_FILL[fill])
    return max(1, min(split_k, triton.cdiv(k, 16)))


def split_k_for(m: int, n: int, k: int, device: torch.device, tile_n: int = 64, per_sm: int = 2,
                max_split: int = 8) -> int:
    """Split the reduction when a decode-sized problem has too few output tiles (``tile_n``
    wide) to give every SM ``per_sm`` programs: a power of two up to ``max_split``, with at
    least 256 columns of K per slice.

    Partials go to an fp32 scratch buffer that is summed afterwards (no atomics: bf16 atomics
    are not portable).
    """
    if INTERPRET or m > 16 or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(n, tile_n)
    if tiles >= sms:
        return 1
    split = min(max_split, triton.cdiv(per_sm * sms, tiles), max(1, k // 256))
    return 1 << (max(1, split).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
