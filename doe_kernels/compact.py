"""Compacted copies of gathered weights, for wrappers that trade memory for speed (CPU)."""

from __future__ import annotations

from typing import Optional

import weakref

import torch

from doe_kernels.validation import stale_weight_error

__all__ = ["CompactWeights", "compact_linear", "use_compact"]


def _identity(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What changes when a tensor's values may have: version, storage, dtype, device."""
    if t is None:
        return None
    return (None if t.is_inference() else t._version), t.data_ptr(), t.dtype, t.device


class CompactWeights:
    """Compacted copies of gathered weights: ``W[idx]`` (and ``b[idx]``) for a rows gather,
    ``W[:, idx]`` for a cols gather, each made once and reused while the weight, its bias and
    the index tensor live and are unchanged. An in-place change (seen by the version counter),
    new storage, dtype or device (``.to()``, ``.half()``, ``load_state_dict``) makes a new copy;
    writes through ``.data`` bypass the version counter and are not seen.

    One store can serve many wrappers and many index tensors; ``nbytes`` is what it holds.
    """

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the compacted copies."""
        return sum(e[-1] for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Free every copy."""
        self._entries.clear()

    def get(self, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor, rows: bool,
            transposed: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(w, b)`` for ``F.linear``: weight (out, in), or (in, out) when ``transposed``
        (Conv1D); idx (n,) kept ids -> w (n, in) and b[idx] for rows, w (out, n) and b for cols."""
        key = (id(weight), id(bias), id(idx), rows, transposed)
        live = (weight, bias, idx)
        versions = tuple(_identity(t) for t in live)
        entry = self._entries.get(key)
        if entry is not None and all(r() is t for r, t in zip(entry[0], live)) and entry[1] == versions:
            return entry[2]
        with torch.inference_mode(False):  # usable later with autograd on the input
            w = weight.detach().t() if transposed else weight.detach()
            w = (w.index_select(0, idx) if rows else w.index_select(1, idx)).contiguous()
            b = bias.detach().index_select(0, idx) if rows and bias is not None else bias
        copies = w.numel() * w.element_size() + (b.numel() * b.element_size() if rows and b is not None else 0)
        entries = self._entries

        def drop(_ref, key=key):
            entries.pop(key, None)

        refs = tuple((lambda: None) if t is None else weakref.ref(t, drop) for t in live)
        entries[key] = (refs, versions, (w, b), copies)
        return w, b

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
               rows: bool, transposed: bool = False) -> torch.Tensor:
        """``F.linear`` on the compacted copy: the same result as the gathered op."""
        w, b = self.get(weight, bias, idx, rows, transposed)
        return torch.nn.functional.linear(x, w, b)


def compact_linear(store: CompactWeights, x, weight, bias, idx, rows: bool, total: int, name: str,
                    transposed: bool = False) -> torch.Tensor:
    """``_linear`` through a :class:`CompactWeights` store (same stale-weight check)."""
    neuron_dim = (1 if transposed else 0) if rows else (0 if transposed else 1)
    if weight.dim() != 2 or weight.shape[neuron_dim] != total:
        raise stale_weight_error(name, total, weight)
    return store.linear(x, weight, bias, idx, rows, transposed)


def use_compact(store: Optional[CompactWeights], weight: torch.Tensor) -> Optional[CompactWeights]:
    """``store``, unless the weight itself needs a gradient (a compacted copy would not pass it on)."""
    if store is None or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    return store
