"""Prefill and greedy decode of a real LLM on CPU: dense vs sliced copy vs gathered vs compact.

    python -m benchmarks.llm [--model smollm2] [--keeps 0.35,0.2] [--batches 1,8] [--prompt 64]
                             [--new 32] [--rounds 3] [--threads 2] [--out FILE.md]

For each keep ratio, four models answer the same random prompts: the dense model, a sliced
copy (smaller FFN layers: the bar), the model under ``doe.unplug_`` gathering the kept neurons
on every forward, and under ``doe.unplug_(..., compact=True)`` (compacted copies of the kept
rows, made once). Rounds are interleaved (every model once per round, the order rotating) and
the median kept. Prefill: one forward over (batch, prompt) tokens; decode: ``generate()`` of
``new`` tokens after it, per token. Next to each speed-up, the Amdahl ideal
``1 / ((1 - f) + keep * f)`` with f the FFN's share of the dense model's time, measured by timing
the FFN blocks inside the same dense runs. Speed does not depend on which neurons are kept, so
the experts are random (``benchmarks.models.make_expert``); accuracy is measured elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import doe
from benchmarks.decode import hf_generate
from benchmarks.models import make_expert
from doe.architectures import find_ffn_blocks
from doe.testing import sliced_copy


class FFNTimer:
    """Wall time spent inside the FFN blocks of ``model`` while enabled (forward pre/post hooks)."""

    def __init__(self, model: nn.Module):
        self.total = 0.0
        self._start: dict = {}
        self._handles = []
        for block in find_ffn_blocks(model):
            m = block.container
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._start.pop(id(module))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _prefill(model, ids):
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _decode(model, ids, new):
    with torch.inference_mode():
        hf_generate(model, ids, new)


def measure(model_name: str, keeps: list, batches: list, prompt: int, new: int, rounds: int) -> list:
    """Rows of (keep, batch, phase, variant, seconds per token or per prefill, ideal)."""
    from doe.models import load_model

    _, dense = load_model(model_name)
    vocab = dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for keep in keeps:
        expert = make_expert(dense, keep)
        sliced = sliced_copy(dense, expert.indices)
        gathered = doe.unplug_(copy.deepcopy(dense), expert, backend="torch")
        compact = doe.unplug_(copy.deepcopy(dense), expert, backend="torch", compact=True)
        models = {"dense": dense, "sliced": sliced, "gathered": gathered, "compact": compact}
        for batch in batches:
            ids = torch.randint(3, vocab, (batch, prompt), generator=g)
            for phase, fn, per in (("prefill", _prefill, 1), ("decode", _decode, new)):
                args = (ids,) if phase == "prefill" else (ids, new)
                for m in models.values():  # warm-up (compaction happens here)
                    fn(m, *args)
                times: dict = {name: [] for name in models}
                ffn_share = []
                names = list(models)
                for r in range(rounds):
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        timer = FFNTimer(dense) if name == "dense" else None
                        t0 = time.perf_counter()
                        fn(models[name], *args)
                        dt = time.perf_counter() - t0
                        if timer is not None:
                            timer.remove()
                            ffn_share.append(timer.total / dt)
                        times[name].append(dt / per)
                f = statistics.median(ffn_share)
                ideal = 1 / ((1 - f) + keep * f)
                base = statistics.median(times["dense"])
                for name in names:
                    t = statistics.median(times[name])
                    rows.append(dict(keep=keep, batch=batch, phase=phase, variant=name, seconds=t,
                                     speedup=base / t, ffn_share=f, ideal=ideal))
                print(f"keep {keep} batch {batch} {phase}: " + ", ".join(
                    f"{r['variant']} {r['speedup']:.2f}x" for r in rows[-len(names):]) + f" (ideal {ideal:.2f}x)",
                      flush=True)
        del sliced, gathered, compact
    return rows


def markdown(rows: list, model_name: str, threads: int, prompt: int, new: int) -> str:
    out = [f"# {model_name} on CPU ({threads} threads): prefill of {prompt} tokens, greedy decode of {new}", "",
           "| keep | batch | phase | dense | sliced | gathered | compact | FFN share | ideal |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["keep"], r["batch"], r["phase"]) for r in rows))
    for keep, batch, phase in keys:
        sel = {r["variant"]: r for r in rows if (r["keep"], r["batch"], r["phase"]) == (keep, batch, phase)}
        unit = "ms" if phase == "prefill" else "ms/token"
        d = sel["dense"]
        cells = [f"{d['seconds'] * 1e3:.1f} {unit}"] + [f"{sel[v]['speedup']:.2f}x" for v in ("sliced", "gathered",
                                                                                           "compact")]
        out.append(f"| {keep} | {batch} | {phase} | " + " | ".join(cells) + f" | {d['ffn_share']:.2f} | "
                   f"{d['ideal']:.2f}x |")
    out += ["", "Speed-ups over dense, medians of interleaved rounds; ideal = 1 / ((1 - f) + keep * f), f the FFN "
            "share of the dense time measured in the same runs."]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--keeps", default="0.35,0.2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.model, [float(k) for k in args.keeps.split(",")], [int(b) for b in args.batches.split(",")],
                   args.prompt, args.new, args.rounds)
    text = markdown(rows, args.model, args.threads, args.prompt, args.new)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
