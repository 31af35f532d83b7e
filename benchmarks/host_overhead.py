"""Host-side cost of a gathered wrapper's forward beyond the op it ends in.

    python -m benchmarks.host_overhead [--calls N] [--repeats R]

Tiny shapes (x (1, 32), weight (88, 32), 30 kept neurons) so that the arithmetic is negligible
and the timings are Python / dispatcher time. Each case times the wrapper's ``forward``, the
module call ``module(x)`` (adds ``nn.Module.__call__``, which the original layer pays too) and
the bare op it ends in: on CPU the backend is "torch" and the bare op is the reference
(``gathered_linear_ref`` / ``gathered_glu_ref`` then the down projection's reference); on CUDA
the backend is "triton" and the bare op is the registered kernel op
(``torch.ops.doe_kernels.*``) launched directly. Overhead = forward - bare. Medians of
``time.perf_counter_ns`` over batches of calls, after a warm-up; CUDA calls are not
synchronised inside a batch, so they measure launch (host) time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from doe_kernels.env import synchronize
from doe_kernels.modules import GatheredGatedMLP, GatheredLinear
from doe_kernels.reference import gathered_glu_ref, gathered_linear_ref
from doe_kernels.testing import random_indices

HIDDEN, INTER, KEPT = 32, 88, 30


def _median_us(fns: list[Callable[[], object]], calls: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Per function: the median over ``repeats`` batches of the mean time of one call in a batch
    of ``calls``. The functions take turns batch by batch, so drift hits them alike."""
    for fn in fns:
        for _ in range(max(calls // 4, 50)):
            fn()
    sync()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter_ns() - start) / calls / 1e3)
            sync()
    return [statistics.median(s) for s in samples]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)


def _cases(device: torch.device):
    """(name, wrapper, input, bare) for rows, cols and the fused gated block."""
    cuda = device.type == "cuda"
    backend = "triton" if cuda else "torch"
    dtype = torch.float16 if cuda else torch.float32
    idx = random_indices(INTER, KEPT, seed=0, dtype=torch.int32, device=device)

    up = nn.Linear(HIDDEN, INTER).to(device, dtype)
    down = nn.Linear(INTER, HIDDEN).to(device, dtype)
    x = torch.randn(1, HIDDEN, device=device, dtype=dtype)
    h = torch.randn(1, KEPT, device=device, dtype=dtype)
    rows = GatheredLinear(up, idx, mode="rows", backend=backend)
    cols = GatheredLinear(down, idx, mode="cols", backend=backend)

    block = _Block().to(device, dtype)
    g, u, d = block.gate_proj, block.up_proj, block.down_proj
    glu = GatheredGatedMLP(block, g, u, d, idx, activation="silu", backend=backend)

    if cuda:
        ops = torch.ops.doe_kernels

        def bare_rows():
            return ops.gathered_linear(x, up.weight, up.bias, idx, True)

        def bare_cols():
            return ops.gathered_linear(h, down.weight, down.bias, idx, False)

        def bare_glu():
            hh = ops.gathered_glu(x, g.weight, u.weight, None, None, idx, "silu")
            return ops.gathered_linear(hh, d.weight, None, idx, False)
    else:
        def bare_rows():
            return gathered_linear_ref(x, up.weight, up.bias, rows=idx)

        def bare_cols():
            return gathered_linear_ref(h, down.weight, down.bias, cols=idx)

        def bare_glu():
            hh = gathered_glu_ref(x, g.weight, u.weight, rows=idx, activation="silu")
            return gathered_linear_ref(hh, d.weight, None, cols=idx)

    return [
        ("GatheredLinear rows", rows, x, bare_rows),
        ("GatheredLinear cols", cols, h, bare_cols),
        ("GatheredGatedMLP (fused)", glu, x, bare_glu),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=15, help="timed batches (the median is reported)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = lambda: synchronize(device)  # noqa: E731
    bare_name = "kernel op" if device.type == "cuda" else "reference"
    print(f"device: {device}  torch {torch.__version__}  backend: "
          f"{'triton' if device.type == 'cuda' else 'torch'}  (us per call, median)")
    header = f"{'case':<26} {bare_name:>10} {'forward':>9} {'module()':>9} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for name, module, x, bare in _cases(device):
            t_bare, t_fwd, t_call = _median_us(
                [bare, lambda: module.forward(x), lambda: module(x)], args.calls, args.repeats, sync
            )
            print(f"{name:<26} {t_bare:>10.2f} {t_fwd:>9.2f} {t_call:>9.2f} {t_fwd - t_bare:>9.2f}")


if __name__ == "__main__":
    main()
