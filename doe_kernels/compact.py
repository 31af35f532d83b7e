"""Compacted copies of gathered weights, for wrappers that trade memory for speed (CPU)."""

from __future__ import annotations

from typing import Callable, Optional

import weakref

import torch

from doe_kernels.validation import stale_weight_error

__all__ = ["CompactWeights", "compact_glu", "compact_linear", "use_compact"]


def _identity(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What changes when a tensor's values may have: version, storage, dtype, device."""
    if t is None:
        return None
    return (None if t.is_inference() else t._version), t.data_ptr(), t.dtype, t.device


class CompactWeights:
    """Compacted copies of gathered weights: ``W[idx]`` (and ``b[idx]``) for a rows gather,
    ``W[:, idx]`` for a cols gather, each made once and reused while the weight, its bias and
    the index tensor live and are unchanged; a gated block's gate and up rows are stacked into
    one copy (``glu``), so both run as one matmul. An in-place change (seen by the version counter),
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

    def _cached(self, live: tuple, key: tuple, make) -> tuple:
        """``make()`` (a tuple whose first tensor is the copy), made again only when a tensor of
        ``live`` (None allowed) has died or changed since the entry under ``key`` was made."""
        key = (*map(id, live), *key)
        versions = tuple(map(_identity, live))
        entry = self._entries.get(key)
        # An entry is dropped when one of its tensors dies (the weakref callbacks), so the ids of a
        # live entry still name the same objects: only their values can have moved.
        if entry is not None and entry[1] == versions:
            return entry[2]
        with torch.inference_mode(False):  # usable later with autograd on the input
            made = make()
        copies = sum(t.numel() * t.element_size() for t in made if t is not None and not any(t is s for s in live))
        entries = self._entries

        def drop(_ref, key=key):
            entries.pop(key, None)

        refs = tuple((lambda: None) if t is None else weakref.ref(t, drop) for t in live)
        entries[key] = (refs, versions, made, copies)
        return made

    def get(self, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor, rows: bool,
            transposed: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(w, b)`` for ``F.linear``: weight (out, in), or (in, out) when ``transposed``
        (Conv1D); idx (n,) kept ids -> w (n, in) and b[idx] for rows, w (out, n) and b for cols."""

        def make():
            w = weight.detach().t() if transposed else weight.detach()
            w = (w.index_select(0, idx) if rows else w.index_select(1, idx)).contiguous()
            return w, (bias.detach().index_select(0, idx) if rows and bias is not None else bias)

        return self._cached((weight, bias, idx), (rows, transposed), make)

    def glu(self, gate: torch.Tensor, gate_bias: Optional[torch.Tensor], up: torch.Tensor,
            up_bias: Optional[torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(w, b)`` for one ``F.linear`` that computes a gated block's gate and up projections
        of the kept neurons together: gate, up (I, in), idx (n,) -> w (2n, in) = [gate[idx]; up[idx]],
        b (2n,) or None (a missing bias counts as zeros when the other has one)."""

        def make():
            w = torch.cat([gate.detach().index_select(0, idx), up.detach().index_select(0, idx)])
            if gate_bias is None and up_bias is None:
                return w, None
            parts = [torch.zeros(idx.numel(), dtype=w.dtype, device=w.device) if b is None
                     else b.detach().index_select(0, idx) for b in (gate_bias, up_bias)]
            return w, torch.cat(parts)

        return self._cached((gate, gate_bias, up, up_bias, idx), ("glu",), make)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
               rows: bool, transposed: bool = False, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``F.linear`` on the compacted copy: the same result as the gathered op; ``offset``
        (out,) is added to the output with the bias (not part of the cached copy)."""
        w, b = self.get(weight, bias, idx, rows, transposed)
        if offset is not None:
            b = offset if b is None else b + offset
        return torch.nn.functional.linear(x, w, b)


def compact_linear(store: CompactWeights, x, weight, bias, idx, rows: bool, total: int, name: str,
                    transposed: bool = False, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``_linear`` through a :class:`CompactWeights` store (same stale-weight check)."""
    neuron_dim = (1 if transposed else 0) if rows else (0 if transposed else 1)
    if weight.dim() != 2 or weight.shape[neuron_dim] != total:
        raise stale_weight_error(name, total, weight)
    return store.linear(x, weight, bias, idx, rows, transposed, offset)


def compact_glu(store: CompactWeights, x: torch.Tensor, gate, gate_bias, up, up_bias, idx: torch.Tensor,
                activation: Callable[[torch.Tensor], torch.Tensor], total: int, name: str) -> torch.Tensor:
    """``act(x @ gate[idx].T) * (x @ up[idx].T)`` (biases included) as one matmul on the store's
    stacked copy (``CompactWeights.glu``): x (..., in), gate / up (I, in) -> (..., n)."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.shape[0] != total:
        raise stale_weight_error(name, total, up)
    w, b = store.glu(gate, gate_bias, up, up_bias, idx)
    g, u = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
    return activation(g) * u


def use_compact(store: Optional[CompactWeights], weight: torch.Tensor) -> Optional[CompactWeights]:
    """``store``, unless the weight itself needs a gradient (a compacted copy would not pass it on)."""
    if store is None or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    return store
