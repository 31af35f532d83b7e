"""Helpers for tests, benchmarks and demos of the gathered ops: random kept-neuron indices and
the relative error of a result against its reference. Nothing here calls the gathered ops."""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["kept_count", "random_indices", "rel_err"]


def kept_count(num_neurons: int, keep: float) -> int:
    """How many of ``num_neurons`` a keep ratio keeps: ``round(keep * num_neurons)``, at least 1."""
    return max(1, round(keep * num_neurons))


def random_indices(
    num_neurons: int,
    kept: int,
    *,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.int64,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """(kept,) sorted unique random neuron ids in [0, num_neurons), drawn on the CPU.

    Args:
        num_neurons: the width of the layer the ids index.
        kept: how many ids (``kept_count`` turns a keep ratio into this).
        generator: a CPU generator to draw from, so that several calls give different ids;
            without one, a fresh generator seeded with ``seed``.
        seed: the seed of that fresh generator.
        dtype, device: of the returned tensor.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    idx = torch.randperm(num_neurons, generator=g)[:kept].sort().values
    return idx.to(dtype=dtype, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (in fp32; the denominator at least 1e-6)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
