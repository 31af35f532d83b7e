"""Where a decode step's time goes: GPU time per kernel kind, and host overhead, dense vs expert.

    python -m benchmarks.profile_decode [--out FILE.md] [--model llama7b|smollm2] [--batches 1,16]
                                        [--keep 0.35] [--context 192] [--steps 8]

For each batch size, a causal LM of the ``generate`` suite's shape (random weights; CPU: the
small smoke model) runs ``steps`` one-token decode steps over a StaticCache filled to
``context`` tokens, as dense, as a sliced copy and under ``doe.unplug_`` (gathered), under
``torch.profiler``. The table splits each step's device time into gathered Triton kernels, cuBLAS
GEMMs, attention, and everything else, and sets it next to the step's wall time in three forms:
eager, in the profiler, and as one CUDA-graph replay. Eager wall time far above device time means
the step is bound by the host (Python and launches), which no kernel change can fix; device time
above the bytes the step must read over the copy bandwidth is what the kernels lose.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import doe
from benchmarks import harness
from benchmarks.decode import StaticDecoder
from benchmarks.models import (build_model, causal_lm_models, cpu_models, ffn_weight_bytes, make_expert,
                               step_weight_bytes)
from doe.testing import sliced_copy
from doe_kernels.env import synchronize

#: kernel kind -> name fragments (lower case), tried in this order
KINDS = (
    ("gathered (Triton)", ("_gathered_", "_segmented_", "_sum_partials", "_glu_sum_partials")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMM (cuBLAS)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "cublas", "splitk")),
)
OTHER = "other (norms, rotary, elementwise, copies)"


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, parts in KINDS:
        if any(p in low for p in parts):
            return kind
    return OTHER


def _device_times(prof) -> dict:
    """Device microseconds per kernel kind, summed over the profiled region."""
    out: dict = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t and getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type):
            out[kind_of(ev.key)] += t
    return out


def _wall_per_step(fn, steps: int, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def profile_model(model: nn.Module, batch: int, context: int, steps: int, vocab: int) -> dict:
    """One model at one batch size: wall and device time per decode step (seconds / us)."""
    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (batch, context), generator=torch.Generator().manual_seed(batch)).to(device)
    eager = StaticDecoder(model, batch, context, 3 * steps + 4, graph=False)
    eager.prepare(ids)
    with torch.inference_mode():
        for _ in range(2):
            eager._step()  # warm-up: Triton autotuning, cuBLAS heuristics
        row = {"eager_ms": _wall_per_step(eager._step, steps, device) * 1e3}
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    eager._step()
                synchronize(device)
            row["device_us"] = {k: v / steps for k, v in _device_times(prof).items()}
            graph = StaticDecoder(model, batch, context, steps + 1, graph=True)
            graph.prepare(ids)
            graph._prefill(ids)  # back to one token written: ``steps`` replays fill the rest of ``out``
            row["graph_ms"] = _wall_per_step(graph.graph.replay, steps, device) * 1e3
    return row


def _fmt(x: Optional[float], digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def run(model_name: str, batches: list, keep: float, context: int, steps: int, out: Optional[Path] = None) -> str:
    """The markdown table; with ``out``, written there after every row (a run cut short keeps its rows)."""
    device = harness.bench_device()
    cfg = causal_lm_models()[model_name] if device.type == "cuda" else cpu_models()["llama-small"]
    if device.type != "cuda":
        cfg = replace(cfg, note="small LlamaForCausalLM, fp32 (CPU smoke run: no device times)")
    dense = build_model(cfg, device, lm_head=True)
    expert = make_expert(dense, keep)
    sliced = sliced_copy(dense, expert.indices).eval()
    gathered = doe.unplug_(build_model(cfg, device, lm_head=True), expert)
    info = harness.device_info(device)
    bw = info.get("copy_bw_GBps")
    lines = [f"# Decode step profile: {cfg.name}, keep {keep:g}", "",
             f"Device: {info.get('device_name')} · torch {info['torch']} · triton {info['triton']} · copy bandwidth "
             f"{_fmt(bw)} GB/s · {cfg.note} · context {context} tokens, {steps} steps per measurement", "",
             "| batch | variant | eager ms/step | graph ms/step | device us/step | " + " | ".join(k for k, _ in KINDS)
             + f" | {OTHER} | weight-read floor us |", "|---|---|" + "---:|" * (len(KINDS) + 5)]
    notes = ["", "- eager ms/step: wall time of one eager step (Python, launches and the GPU); graph ms/step: the "
             "same step as one CUDA-graph replay; device us/step: the kernels' own time in the profiler.",
             "- weight-read floor: the bytes of weights the step reads (an untied input embedding excluded, the LM "
             "head included; the gathered model's pruned neurons excluded) over the copy bandwidth, KV cache left "
             "out: no step can be faster.", ""]
    for b in batches:
        for variant, model in (("dense", dense), ("sliced", sliced), ("gathered", gathered)):
            row = profile_model(model, b, context, steps, cfg.vocab)
            dev = row.get("device_us", {})
            weights = step_weight_bytes(model)
            if variant == "gathered":  # the pruned neurons stay allocated but are never read
                weights -= ffn_weight_bytes(dense) * (1.0 - keep)
            floor = weights / (bw * 1e9) * 1e6 if bw else None
            lines.append(f"| {b} | {variant} | {_fmt(row['eager_ms'], 2)} | {_fmt(row.get('graph_ms'), 2)} | "
                         f"{_fmt(sum(dev.values()) if dev else None)} | "
                         + " | ".join(_fmt(dev.get(k)) if dev else "" for k, _ in KINDS)
                         + f" | {_fmt(dev.get(OTHER)) if dev else ''} | {_fmt(floor)} |")
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("\n".join(lines + notes))
    return "\n".join(lines + notes)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--model", default="llama7b", choices=sorted(causal_lm_models()), help="CUDA: the model shape")
    ap.add_argument("--batches", default="1,16", help="comma list of batch sizes (default 1,16)")
    ap.add_argument("--keep", type=float, default=0.35, help="the expert's keep ratio (default 0.35)")
    ap.add_argument("--context", type=int, default=192, help="tokens in the cache (default 192)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per measurement (default 8)")
    args = ap.parse_args(argv)
    if not 0.0 < args.keep < 1.0:
        ap.error(f"--keep: expected a ratio in (0, 1), got {args.keep}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    print(run(args.model, batches, args.keep, args.context, args.steps, Path(args.out) if args.out else None))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
