"""Test set-up: Triton kernels run through the interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at the
top of the first module pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
