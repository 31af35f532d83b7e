"""Environment and device helpers shared by every layer (one source for each).

    interpreting()        True when Triton runs kernels on CPU tensors (TRITON_INTERPRET)
    env_flag(name)        a boolean environment variable, read the way Triton reads its own
    synchronize(device)   wait for the device's queued work (a no-op on CPU)
    DTYPES, dtype_name,   "fp32" | "fp16" | "bf16" <-> torch dtypes
    parse_dtype
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

__all__ = ["DTYPES", "dtype_name", "env_flag", "interpreting", "parse_dtype", "synchronize"]

_TRUE = {"1", "true", "yes", "on", "y"}

#: Short dtype names used by the command line, the benchmarks and the test ids.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def env_flag(name: str, default: bool = False) -> bool:
    """True when environment variable ``name`` is 1/true/yes/on/y (any case), as Triton reads flags."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in _TRUE


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter.

    Read at call time; Triton itself reads ``TRITON_INTERPRET`` when it is first imported, so
    set the variable before that.
    """
    return env_flag("TRITON_INTERPRET")


def synchronize(device: Union[torch.device, str, None] = None) -> None:
    """Block until ``device``'s queued kernels are done (CUDA); a no-op for CPU or None."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of ``dtype`` ("fp32", "fp16", "bf16"); raises for any other dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype: expected one of {list(DTYPES.values())}, got {dtype}")


def parse_dtype(name: Optional[str]) -> torch.dtype:
    """The torch dtype of a short name ("fp32", "fp16", "bf16")."""
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]

