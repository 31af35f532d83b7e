"""Launch configuration shared by the gathered kernels.

Tuning constants. Where they come from: the large-M tiles are the ones Triton's matmul
tutorial autotunes over for Hopper/Ampere (128x128x64, 128x256x64, 64x128x64 ...), the
small-M (decode) tiles keep BLOCK_M at 16 (the smallest ``tl.dot`` tile the GPU backend
compiles) and spend the threads on N and K instead, as decode GEMV kernels do. They have
not yet been tuned on an H100 here; the GPU campaign issue re-measures them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

#: True when kernels run on CPU tensors through Triton's interpreter (CI).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: M is bucketed to the next power of two (capped) so that autotuning runs once per bucket,
#: not once per sequence length.
MAX_M_BUCKET = 4096

_LARGE_M = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
    (128, 128, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
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
#: The interpreter cannot autotune (no driver) and is slow: one small config, every dim >= 16.
_INTERPRETER = [(16, 32, 32, 4, 4, 1)]


def _configs(rows) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, gm, w, s in rows
    ]


def autotune_configs() -> list[triton.Config]:
    if INTERPRET:
        return _configs(_INTERPRETER)
    return _configs(_SMALL_M + _MID_M + _LARGE_M)


def prune_configs(configs, named_args, **kwargs):
    """Keep the tiles that fit the M bucket: decode tiles for M <= 16, big tiles for big M."""
    if len(configs) <= 1:
        return configs
    m = named_args["M_BUCKET"]
    if m <= 16:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    elif m <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] in (32, 64)]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    return keep or configs


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), MAX_M_BUCKET)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch, so the kernel matches what F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def split_k_for(m: int, n: int, k: int, device: torch.device) -> int:
    """Split the reduction when a decode-sized problem has too few output tiles to fill the GPU.

    Partials go to an fp32 scratch buffer that is summed afterwards (no atomics: bf16 atomics
    are not portable, see TRITON_NOTES.md).
    """
    if INTERPRET or m > 16 or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(n, 64)
    if tiles >= sms:
        return 1
    split = min(8, triton.cdiv(2 * sms, tiles), max(1, k // 256))
    return max(1, split)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
