"""A short kernel demo: gathered vs sliced vs dense FFN projections on the current device.

    python -m doe_kernels.demo [--keep 0.35] [--dtype bf16] [--hidden 768 --inter 3072]

Prints, per projection and batch size M, the median time of dense F.linear on the full weight,
F.linear on a sliced copy (what structured pruning costs in memory), and the gathered op on
the original weight (Triton on CUDA, the index_select reference on CPU), plus the max error of
the gathered result against the sliced one. CPU timings are a smoke signal, not a result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from doe_kernels import gathered_linear, resolve_backend, to_neuron_major_
from doe_kernels.env import DTYPES, parse_dtype, synchronize
from doe_kernels.testing import kept_count, random_indices


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call."""
    fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(hidden: int, inter: int, keep: float, dtype: torch.dtype, ms: list[int], reps: int) -> list[dict]:
    """Time dense, sliced and gathered up (I, H) and down (H, I, neuron-major) projections.

    Args:
        hidden, inter: H and I of the random weights.
        keep: fraction of the I neurons kept (random, sorted).
        dtype: of weights and inputs.
        ms: the M (rows of x) to time.
        reps: timed calls per case (the median is kept).

    Returns:
        One dict per (op, M): median seconds of dense / sliced / gathered and the max error of
        gathered vs sliced.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    w_up = (torch.randn(inter, hidden, generator=g) / hidden**0.5).to(device, dtype)
    w_down = (torch.randn(hidden, inter, generator=g) / inter**0.5).to(device, dtype)
    to_neuron_major_(w_down, 1)
    kept = kept_count(inter, keep)
    idx = random_indices(inter, kept, generator=g, dtype=torch.int32, device=device)
    up_sliced, down_sliced = w_up[idx.long()].contiguous(), w_down[:, idx.long()].contiguous()
    rows = []
    for m in ms:
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        h = torch.randn(m, kept, device=device, dtype=dtype)
        h_full = torch.randn(m, inter, device=device, dtype=dtype)
        cases = {
            "up": (lambda: F.linear(x, w_up), lambda: F.linear(x, up_sliced),
                   lambda: gathered_linear(x, w_up, rows=idx)),
            "down": (lambda: F.linear(h_full, w_down),
                     lambda: F.linear(h, down_sliced), lambda: gathered_linear(h, w_down, cols=idx)),
        }
        for op, (dense, sliced, gathered) in cases.items():
            err = (gathered().float() - sliced().float()).abs().max().item()
            t_dense, t_sliced, t_gathered = (_time(f, device, reps) for f in (dense, sliced, gathered))
            rows.append(dict(op=op, M=m, dense=t_dense, sliced=t_sliced, gathered=t_gathered, max_err=err))
    return rows


def main(argv=None) -> None:
    """``python -m doe_kernels.demo``: parse the flags, run, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768, help="hidden size H (BERT-base: 768)")
    parser.add_argument("--inter", type=int, default=3072, help="FFN intermediate size I (BERT-base: 3072)")
    parser.add_argument("--keep", type=float, default=0.35, help="fraction of FFN neurons kept (default 0.35)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128], help="batch x sequence rows M")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per case")
    args = parser.parse_args(argv)
    if not 0 < args.keep <= 1:
        parser.error(f"--keep: expected a fraction in (0, 1], got {args.keep}")
    cuda = torch.cuda.is_available()
    dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    backend = resolve_backend("auto", torch.empty(0, device="cuda" if cuda else "cpu"))
    print(f"device: {device_name} | backend: {backend} | H={args.hidden} I={args.inter} keep={args.keep} "
          f"dtype={str(dtype).replace('torch.', '')}")
    if not cuda:
        print("(no GPU: gathered runs the PyTorch reference, which copies the kept rows each call)")
    rows = run(args.hidden, args.inter, args.keep, dtype, args.m, args.reps)
    print(f"{'op':<5} {'M':>5} {'dense us':>10} {'sliced us':>10} {'gathered us':>12} "
          f"{'gath/sliced':>12} {'dense/gath':>11} {'max err':>9}")
    for r in rows:
        print(f"{r['op']:<5} {r['M']:>5} {r['dense'] * 1e6:>10.1f} {r['sliced'] * 1e6:>10.1f} "
              f"{r['gathered'] * 1e6:>12.1f} {r['gathered'] / r['sliced']:>12.2f} "
              f"{r['dense'] / r['gathered']:>11.2f} {r['max_err']:>9.2e}")


if __name__ == "__main__":
    main()
