"""Shared test constants: the device under test and per-dtype tolerances."""

import torch

from doe_kernels.dispatch import triton_available
from doe_kernels.env import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Per-dtype tolerances (atol, rtol) against an fp32 reference on the same inputs. bf16 needs
#: more than one ulp: the interpreter truncates fp32 -> bf16 instead of rounding.
TOLERANCES = {
    torch.float32: (2e-4, 2e-4),  # the kernels use IEEE fp32 dots unless torch allows TF32
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
}

def triton_runs() -> bool:
    """Triton kernels can run: triton is installed, and a GPU or the interpreter is there."""
    return triton_available() and (DEVICE == "cuda" or interpreting())
