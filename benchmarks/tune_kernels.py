"""Launch-config sweep of the gathered kernels on the shapes that decide a 7B decode step and prefill.

    python -m benchmarks.tune_kernels [--out FILE.md] [--keep 0.35] [--groups decode,batch,large] [--smoke]

Each candidate config (tile, warps, stages, split-K) is launched directly (``config=``, no
autotuner) and timed as CUDA-graph replays that cycle through enough copies of the weights to
defeat the L2, so the time is the kernel's own at the bandwidth the model sees. Next to each
group: the bar it must meet, measured in the same run. LLaMA-7B FFN, bf16, keep ``--keep``:

- ``decode`` (M = 1): the fused gate/up GEMV (rows gather on row-major weights) and the down
  GEMV (cols gather on the neuron-major down weight) against the copy-bandwidth floor
  (kept-weight bytes / measured copy bandwidth) and cuBLAS on a sliced copy padded to 16;
- ``batch`` (M = 16): the GEMV form and the ``tl.dot`` form, autotuned and by config;
- ``large`` (M = 2048, 8192): the dot tiles of the up projection (rows gather) and of the fused
  GLU against cuBLAS on the padded sliced copy, and "gather then cuBLAS" (the kept rows copied
  into a padded buffer, then one cuBLAS GEMM, timed together); the down projection (cols
  gather) autotuned against ``path="gather"`` and the same bar.

The markdown (every row, fastest first per kind) is rewritten after every row, so an
interrupted sweep keeps what it measured; ``--json`` writes the rows too. ``--smoke`` runs every
case once on CPU through Triton's interpreter at a tiny shape (the sweep's own test; no timing
worth reading).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import device_info, measure_copy_bandwidth

HIDDEN, INTER = 4096, 11008
SMOKE_HIDDEN, SMOKE_INTER = 64, 176
#: weight bytes the timed loop cycles through, so that no copy stays in the 50 MB L2
ROTATE_BYTES = 600 << 20


def graph_us(calls: list, loops: int = 4, rounds: int = 7) -> float:
    """Median microseconds of one call: every call of ``calls`` (one per weight copy), ``loops``
    times, captured in one CUDA graph and replayed ``rounds`` times."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(loops):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (loops * len(calls)))
    del graph
    return statistics.median(times)


def once_us(calls: list, loops: int = 1, rounds: int = 1) -> float:
    """``graph_us`` for the CPU smoke run: each call once, wall time."""
    import time

    start = time.perf_counter()
    for c in calls:
        c()
    return (time.perf_counter() - start) * 1e6 / len(calls)


def _copies(make: Callable[[], tuple], per_copy_bytes: int, rotate_bytes: int = ROTATE_BYTES) -> list:
    """Enough results of ``make()`` to hold ``rotate_bytes`` (at least two, at most 16)."""
    return [make() for _ in range(min(16, max(2, -(-rotate_bytes // max(1, per_copy_bytes)))))]


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


class Sweep:
    """Rows of (group, what, config, us, ratio to the group's bar) and the markdown they make."""

    def __init__(self, out: Optional[Path], json_path: Optional[Path], info: dict, keep: float, shape: tuple):
        self.out, self.json_path, self.info, self.keep, self.shape = out, json_path, info, keep, shape
        self.rows: list = []
        self.bars: dict = {}
        self.notes: list = []

    def add(self, group: str, what: str, config: str, fn: Callable[[], float]) -> Optional[float]:
        try:
            us = fn()
        except Exception as exc:  # a config that does not compile or launch is a row, not the end
            msg = str(exc).strip().splitlines()
            self.rows.append(dict(group=group, what=what, config=config, us=None,
                                  error=f"{type(exc).__name__}: {(msg or [''])[0][:120]}"))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.write()
            return None
        self.rows.append(dict(group=group, what=what, config=config, us=us))
        self.write()
        print(f"{group:>14} {what:<28} {config:<44} {us:9.1f} us", flush=True)
        return us

    def bar(self, group: str, name: str, us: Optional[float]) -> None:
        if us is not None:
            self.bars.setdefault(group, []).append((name, us))

    def markdown(self) -> str:
        gpu = self.info.get("gpu", self.info.get("device", "?"))
        lines = [f"# Gathered-kernel config sweep ({gpu})", "",
                 f"FFN of hidden {self.shape[0]}, intermediate {self.shape[1]}, keep {self.keep}; CUDA-graph "
                 "replays over rotating weight copies; microseconds per call.", "", *self.notes, ""]
        for group in dict.fromkeys(r["group"] for r in self.rows):
            bars = self.bars.get(group, [])
            lines += [f"## {group}", ""]
            lines += [f"- bar: {name} {us:.1f} us" for name, us in bars]
            lines += ["", "| what | config | us | / first bar |", "|---|---|---:|---:|"]
            ok = sorted((r for r in self.rows if r["group"] == group and r["us"] is not None),
                        key=lambda r: (r["what"], r["us"]))
            for r in ok:
                ratio = f"{r['us'] / bars[0][1]:.2f}" if bars else ""
                lines.append(f"| {r['what']} | {r['config']} | {r['us']:.1f} | {ratio} |")
            bad = [r for r in self.rows if r["group"] == group and r["us"] is None]
            lines += [f"| {r['what']} | {r['config']} | failed: {r['error']} | |" for r in bad]
            lines.append("")
        return "\n".join(lines)

    def write(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.markdown())
        if self.json_path is not None:
            self.json_path.write_text(json.dumps(dict(info=self.info, keep=self.keep, shape=self.shape,
                                                      bars=self.bars, rows=self.rows), indent=1))


def _cfg(bn, bk, w, s, bm=None, gm=None):
    import triton

    kw = {"BLOCK_N": bn, "BLOCK_K": bk}
    if bm is not None:
        kw.update(BLOCK_M=bm, GROUP_M=gm)
    return triton.Config(kw, num_warps=w, num_stages=s)


def _name(c, split=None) -> str:
    kw = c.kwargs
    tile = f"{kw.get('BLOCK_M', '-')}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
    extra = f" g{kw['GROUP_M']}" if "GROUP_M" in kw else ""
    sk = f" sk{split}" if split is not None else ""
    return f"{tile} w{c.num_warps} s{c.num_stages}{extra}{sk}"


def ffn_weights(device, dtype, hidden: int, inter: int, n: int, seed: int):
    """Kept rows idx (n,) int32, gate/up (inter, hidden) row-major, down as stored after unplug:
    a neuron-major (hidden, inter) view of an (inter, hidden) tensor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(inter, generator=g)[:n].sort().values.to(device=device, dtype=torch.int32)
    wg = torch.randn(inter, hidden, device=device, dtype=dtype) * 0.02
    wu = torch.randn(inter, hidden, device=device, dtype=dtype) * 0.02
    wd = (torch.randn(inter, hidden, device=device, dtype=dtype) * 0.02).t()
    return idx, wg, wu, wd


def sliced(idx, wg, wu, wd):
    """cuBLAS's operands: [gate; up] kept rows (2p, hidden) and the down weight's kept columns
    (hidden, p), contiguous copies with the kept width padded to p, a multiple of 16."""
    n, p, hidden = idx.numel(), _pad16(idx.numel()), wg.shape[1]
    li = idx.long()
    gu = torch.zeros(2 * p, hidden, device=wg.device, dtype=wg.dtype)
    gu[:n] = wg[li]
    gu[p:p + n] = wu[li]
    d = torch.zeros(hidden, p, device=wg.device, dtype=wg.dtype)
    d[:, :n] = wd[:, li]
    return gu, d


DECODE_TILES = {
    "glu": [(8, 512), (16, 256), (16, 512), (32, 128), (32, 256), (64, 64), (64, 128)],
    "down": [(64, 128), (128, 64), (128, 128), (256, 32), (256, 64), (64, 256), (512, 32)],
}
LARGE_LINEAR = ((128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
                (128, 128, 64, 8, 8, 5), (128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 64, 16, 8, 3),
                (64, 256, 64, 8, 4, 4))
LARGE_GLU = ((128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 4, 4), (128, 64, 64, 8, 8, 4),
             (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 5))


def run(groups: list, keep: float, out: Optional[Path], json_path: Optional[Path], smoke: bool = False) -> Sweep:
    from doe_kernels.ops.gathered_glu_kernel import gathered_glu_mm
    from doe_kernels.ops.gathered_linear_kernel import gathered_mm

    if smoke:
        dev, dt, hidden, inter, tm = torch.device("cpu"), torch.float32, SMOKE_HIDDEN, SMOKE_INTER, once_us
        bw, big_m, batch_m = None, (32,), 16
    else:
        dev, dt, hidden, inter, tm = torch.device("cuda"), torch.bfloat16, HIDDEN, INTER, graph_us
        bw, big_m, batch_m = measure_copy_bandwidth(dev), (2048, 8192), 16
    sweep = Sweep(out, json_path, device_info(dev), keep, (hidden, inter))
    n = int(round(keep * inter))
    p = _pad16(n)
    esize = torch.empty((), dtype=dt).element_size()
    sweep.notes.append(f"Kept neurons {n} (padded {p})" + (f"; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)."
                                                            if bw else "."))
    sets = _copies(lambda: ffn_weights(dev, dt, hidden, inter, n, 0), 3 * inter * hidden * esize,
                   0 if smoke else ROTATE_BYTES)
    slices = [sliced(*s) for s in sets]
    glu_bytes, down_bytes = 2 * n * hidden * esize, n * hidden * esize

    def floor_us(nbytes):  # bytes read once at the copy's rate (which counts read + write)
        return nbytes / bw * 1e6 if bw else None

    def xs(m, k):
        return torch.randn(m, k, device=dev, dtype=dt)

    def glu_calls(x, use=None, **kw):
        return [lambda s=s: gathered_glu_mm(x, s[1], s[2], rows=s[0], activation="silu", **kw)
                for s in (use or sets)]

    def down_calls(h, use=None, **kw):
        return [lambda s=s: gathered_mm(h, s[3], cols=s[0], **kw) for s in (use or sets)]

    def cublas_glu(x, use=None):
        def one(gu):
            y = F.linear(x, gu)
            return F.silu(y[:, :p]) * y[:, p:]
        return [lambda gu=gu: one(gu) for gu, _ in (use or slices)]

    def cublas_down(h):
        return [lambda d=d: F.linear(h, d) for _, d in slices]

    if "decode" in groups:
        for kind in ("glu", "down"):
            group = f"decode M=1, {kind}"
            glu = kind == "glu"
            sweep.bar(group, "copy floor", floor_us(glu_bytes if glu else down_bytes))
            x = xs(1, hidden) if glu else xs(1, n)
            sweep.bar(group, "cuBLAS sliced padded", sweep.add(group, "cuBLAS sliced padded", "", lambda: tm(
                cublas_glu(x) if glu else cublas_down(xs(1, p)))))

            def calls(**kw):
                return glu_calls(x, path="gemv", **kw) if glu else down_calls(x, path="gemv", **kw)

            sweep.add(group, "gemv autotuned", "split by heuristic", lambda: tm(calls()))
            results = []
            for (bn, bk), w, split in itertools.product(DECODE_TILES[kind], (4, 8), (1, 2, 4, 8)):
                c = _cfg(bn, bk, w, 2)
                us = sweep.add(group, "gemv", _name(c, split), lambda c=c, split=split: tm(
                    calls(config=c, split_k=split)))
                if us is not None:
                    results.append((us, bn, bk, w, split))
                if smoke:
                    break
            for _, bn, bk, w, split in sorted(results)[:3]:
                for st in (1, 3, 4):
                    c = _cfg(bn, bk, w, st)
                    sweep.add(group, "gemv", _name(c, split), lambda c=c, split=split: tm(
                        calls(config=c, split_k=split)))

    if "batch" in groups:
        m = batch_m
        x, h = xs(m, hidden), xs(m, n)
        for kind in ("glu", "down"):
            group = f"batch M={m}, {kind}"
            glu = kind == "glu"
            sweep.bar(group, "copy floor", floor_us(glu_bytes if glu else down_bytes))
            sweep.bar(group, "cuBLAS sliced padded", sweep.add(group, "cuBLAS sliced padded", "", lambda: tm(
                cublas_glu(x) if glu else cublas_down(xs(m, p)))))

            def batch_calls(path, **kw):
                return glu_calls(x, path=path, **kw) if glu else down_calls(h, path=path, **kw)

            sweep.add(group, "dot autotuned", "", lambda: tm(batch_calls("dot")))
            for split in (None, 1, 2, 4):
                sweep.add(group, "gemv autotuned", f"sk{split or ' by heuristic'}", lambda split=split: tm(
                    batch_calls("gemv", split_k=split)))
            tiles = ((16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4)) if glu else \
                ((64, 128, 4), (128, 64, 4), (128, 128, 8), (256, 64, 8))
            for (bn, bk, w), split in itertools.product(tiles[:1] if smoke else tiles, (1, 2, 4)):
                c = _cfg(bn, bk, w, 2)
                sweep.add(group, "gemv", _name(c, split), lambda c=c, split=split: tm(
                    batch_calls("gemv", config=c, split_k=split)))

    if "large" in groups:
        for m in big_m:
            group = f"large M={m}, up"
            x = xs(m, hidden)
            two = sets[:2]  # at this M the GEMM is compute-bound: two copies are enough
            sweep.bar(group, "cuBLAS sliced padded", sweep.add(group, "cuBLAS sliced padded", "", lambda: tm(
                [lambda gu=gu: F.linear(x, gu[p:]) for gu, _ in slices[:2]], loops=2, rounds=5)))
            sweep.bar(group, "cuBLAS dense", sweep.add(group, "cuBLAS dense", "", lambda: tm(
                [lambda s=s: F.linear(x, s[2]) for s in two], loops=2, rounds=5)))
            bufs = [torch.zeros(p, hidden, device=dev, dtype=dt) for _ in two]

            def gather_gemm(s, buf):
                torch.index_select(s[2], 0, s[0], out=buf[:n])
                return F.linear(x, buf)

            sweep.add(group, "gather then cuBLAS", "", lambda: tm(
                [lambda s=s, b=b: gather_gemm(s, b) for s, b in zip(two, bufs)], loops=2, rounds=5))
            sweep.add(group, "gathered autotuned", "", lambda: tm(
                [lambda s=s: gathered_mm(x, s[2], rows=s[0]) for s in two], loops=2, rounds=5))
            for bm, bn, bk, gm, w, st in LARGE_LINEAR[:1] if smoke else LARGE_LINEAR:
                c = _cfg(min(bn, 32) if smoke else bn, 16 if smoke else bk, w, st, bm=16 if smoke else bm, gm=gm)
                sweep.add(group, "gathered", _name(c), lambda c=c: tm(
                    [lambda s=s: gathered_mm(x, s[2], rows=s[0], path="dot", config=c) for s in two],
                    loops=2, rounds=5))
            group = f"large M={m}, down"
            h, h_pad = xs(m, n), xs(m, p)
            sweep.bar(group, "cuBLAS sliced padded", sweep.add(group, "cuBLAS sliced padded", "", lambda: tm(
                [lambda d=d: F.linear(h_pad, d) for _, d in slices[:2]], loops=2, rounds=5)))
            sweep.add(group, "gather then cuBLAS", "", lambda: tm(down_calls(h, two, path="gather"), loops=2,
                                                                  rounds=5))
            sweep.add(group, "gathered autotuned", "", lambda: tm(down_calls(h, two), loops=2, rounds=5))
            group = f"large M={m}, glu"
            sweep.bar(group, "cuBLAS sliced padded + silu*mul", sweep.add(
                group, "cuBLAS sliced padded + silu*mul", "", lambda: tm(cublas_glu(x, slices[:2]), loops=2,
                                                                         rounds=5)))
            sweep.add(group, "fused gathered autotuned", "", lambda: tm(glu_calls(x, two), loops=2, rounds=5))
            for bm, bn, bk, gm, w, st in LARGE_GLU[:1] if smoke else LARGE_GLU:
                c = _cfg(min(bn, 32) if smoke else bn, 16 if smoke else bk, w, st, bm=16 if smoke else bm, gm=gm)
                sweep.add(group, "fused gathered", _name(c), lambda c=c: tm(
                    glu_calls(x, two, path="dot", config=c), loops=2, rounds=5))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    sweep.write()
    return sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown report (rewritten after every row)")
    ap.add_argument("--json", type=Path, default=None, help="every row as JSON (default: next to --out)")
    ap.add_argument("--keep", type=float, default=0.35)
    ap.add_argument("--groups", default=os.environ.get("DOE_TUNE_GROUPS", "decode,batch,large"),
                    help="comma list of decode, batch, large (default $DOE_TUNE_GROUPS, else all)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shape, one config each")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(groups) - {"decode", "batch", "large"})
    if unknown:
        ap.error(f"--groups: expected decode, batch or large, got {', '.join(unknown)}")
    if not args.smoke and not torch.cuda.is_available():
        print("tune_kernels: needs a CUDA device (it times compiled kernels; --smoke checks it on CPU); nothing run")
        return 0
    json_path = args.json or (args.out.with_suffix(".json") if args.out is not None else None)
    try:
        sweep = run(groups, args.keep, args.out, json_path, smoke=args.smoke)
    except KeyboardInterrupt:
        print("tune_kernels: interrupted; the report holds every finished row", file=sys.stderr)
        return 130
    print(sweep.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
