"""Backend choice: Triton for CUDA tensors, the PyTorch reference otherwise, or forced.

``backend="auto"`` resolves through, in order: a ``use_backend(...)`` context, the
``DOE_BACKEND`` environment variable ("triton" / "torch"), then the device of the input.

Triton is optional (it has wheels for Linux only): without it "auto" runs the reference
everywhere, and only an explicit "triton" fails.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

from doe_kernels.env import interpreting

__all__ = ["BACKENDS", "resolve_backend", "use_backend", "triton_available"]

BACKENDS = ("auto", "triton", "torch")
_local = threading.local()


def _import_triton() -> Optional[str]:
    """None when triton imports, else why not (not installed, or broken on this host)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# Decided once at import: a plain constant keeps torch.compile from tracing through a cache.
_TRITON_ERROR = _import_triton()
_TRITON = _TRITON_ERROR is None


def triton_available() -> bool:
    """True when triton imports on this host."""
    return _TRITON


def _check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Force a backend for ``backend="auto"`` calls on this thread (e.g. ``"torch"`` to compare)."""
    _check_name(backend)
    previous = getattr(_local, "backend", None)
    _local.backend = None if backend == "auto" else backend
    try:
        yield
    finally:
        _local.backend = previous


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op on tensor ``x``."""
    if backend == "auto":
        backend = getattr(_local, "backend", None) or os.environ.get("DOE_BACKEND") or "auto"
    _check_name(backend)
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"backend='triton' needs the triton package, but it cannot be imported here ({_TRITON_ERROR}). "
                "Triton publishes wheels for Linux only: install it there (pip install triton), or use "
                "backend='torch' or 'auto' (the PyTorch reference)"
            )
        if x.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'"
            )
        if x.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' supports CUDA (or interpreted CPU) tensors, got {x.device}")
    return backend
