"""Whole-model forward: dense vs a sliced copy vs gathered vs compact experts, measured in one run.

    python -m benchmarks.compact [--model llama-small] [--batch 1] [--seq 256] [--keep 0.35] [--rounds 40]

The variants take turns round by round (a noisy machine slows them alike) and each speed-up
over dense is the ratio of medians. ``compact`` is ``doe.unplug_(..., compact=True)``: the
original model multiplying with compacted copies of the kept weights, made on the first
forward; its memory is reported next to the FFN weights' size. Every variant is checked
against the sliced copy before timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import doe
from benchmarks.harness import bench_device
from benchmarks.models import cpu_models, gpu_models, model_inputs, build_model, make_expert
from doe.testing import sliced_copy
from doe_kernels.env import synchronize
from doe_kernels.testing import rel_err

VARIANTS = ("dense", "sliced", "gathered", "compact")


def measure(model_name: str, batch: int, seq: int, keep: float, rounds: int) -> dict:
    device = bench_device()
    models = {**cpu_models(), **gpu_models()}
    if model_name not in models:
        raise SystemExit(f"--model: expected one of {sorted(models)}, got {model_name!r}")
    cfg = models[model_name]
    dense = build_model(cfg, device)
    expert = make_expert(dense, keep)
    runs = {"dense": dense, "sliced": sliced_copy(dense, expert.indices).eval(), "gathered": copy.deepcopy(dense)}
    runs["compact"] = runs["gathered"]
    inputs = model_inputs(cfg, batch, seq, device)

    def run(variant: str):
        if variant in ("gathered", "compact"):
            doe.unplug_(runs[variant], expert, compact=variant == "compact")  # an index swap after the first
        return runs[variant](**inputs).last_hidden_state

    times = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        ref = run("sliced")
        errors = {v: rel_err(run(v), ref) for v in ("gathered", "compact")}
        for _ in range(rounds):
            for v in VARIANTS:
                run(v)  # the switch (if any) happens here, untimed
                synchronize(device)
                t0 = time.perf_counter()
                run(v)
                synchronize(device)
                times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    ffn_bytes = sum(p.numel() * p.element_size() for b in doe.find_ffn_blocks(dense)
                    for layer in (b.up, b.gate, b.down) if layer is not None for p in layer.parameters())
    out = {
        "model": model_name, "note": cfg.note, "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "batch": batch, "seq": seq, "keep": keep, "rounds": rounds,
        "ms": {v: round(1e3 * m, 3) for v, m in med.items()},
        "speedup_over_dense": {v: round(med["dense"] / med[v], 3) for v in VARIANTS[1:]},
        "fraction_of_sliced_speedup": {v: round(med["sliced"] / med[v], 3) for v in ("gathered", "compact")},
        "compact_weight_bytes": doe.compact_memory(runs["compact"]),
        "ffn_weight_bytes": ffn_bytes,
        "rel_err_vs_sliced": errors,
    }
    doe.restore_(runs["gathered"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--keep", type=float, default=0.35)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args()
    r = measure(a.model, a.batch, a.seq, a.keep, a.rounds)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['model']} ({r['note']}), batch {r['batch']} x seq {r['seq']}, keep {r['keep']}, {r['device']}, "
          f"{r['threads']} threads, torch {r['torch']}, median of {r['rounds']} interleaved rounds")
    print("| variant | ms | speed-up over dense | share of the sliced copy's speed-up |")
    print("|---|---:|---:|---:|")
    for v in VARIANTS:
        share = r["fraction_of_sliced_speedup"].get(v)
        print(f"| {v} | {r['ms'][v]:.2f} | {r['speedup_over_dense'].get(v, 1.0):.2f}x | "
              f"{'' if share is None else f'{share:.2f}'} |")
    print(f"compact copies: {r['compact_weight_bytes'] / 2**20:.1f} MiB (FFN weights: "
          f"{r['ffn_weight_bytes'] / 2**20:.1f} MiB); rel. error vs sliced: gathered "
          f"{r['rel_err_vs_sliced']['gathered']:.1e}, compact {r['rel_err_vs_sliced']['compact']:.1e}")


if __name__ == "__main__":
    main()
