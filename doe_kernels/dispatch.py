"""Backend choice: Triton for CUDA tensors, the PyTorch reference otherwise, or forced.

``backend="auto"`` resolves through, in order: a ``use_backend(...)`` context, the
``DOE_BACKEND`` environment variable ("triton" / "torch"), then the device of the input.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from doe_kernels.env import interpreting

__all__ = ["BACKENDS", "resolve_backend", "use_backend", "triton_available"]

BACKENDS = ("auto", "triton", "torch")
_local = threading.local()


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but may be broken on exotic hosts
        return False
    return True


# Decided once at import: a plain constant keeps torch.compile from tracing through a cache.
_TRITON = _import_triton()


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
            raise RuntimeError("backend='triton' was requested but triton cannot be imported")
        if x.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'"
            )
        if x.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' supports CUDA (or interpreted CPU) tensors, got {x.device}")
    return backend
