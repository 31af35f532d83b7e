"""Mixed-task batches: one forward over requests of k tasks vs one task at a time vs dense.

Suite ``mixed`` (``benchmarks.report`` writes ``mixed.md``). A batch of B requests, request i
of task i % k, each task with its own random expert at keep 0.35 (``test_models.make_expert``
with seeds 1..k). Variants, each one forward over the whole batch:

- ``dense``:      the batch on the original model.
- ``single``:     the batch on one expert (``doe.unplug_(model, expert)``): the bar; the goal is
                  mixed <= 1.10 x single.
- ``mixed``:      ``doe.unplug_(model, {task: expert})`` installed beforehand; the timed call
                  enters ``doe.mixed_batch(model, tasks)`` (building the row tables) and runs
                  one forward.
- ``sequential``: the one-task-at-a-time runtime: for each task, ``doe.unplug_`` (an index swap)
                  and a forward over its requests (pre-split sub-batches).

Models as in ``test_models.py`` (random weights; ``llama7b-4L`` and ``bert-base`` on CUDA,
tiny configs on CPU). Shapes: prefill (B x seq) and decode-like seq 1 (one token per
sequence, no KV cache), k in {1, 2, 4, 8} with k <= B. Sweeps (DOE_BENCH_SWEEP): ``full`` B
{8, 16, 64} x seq {128, 512} plus seq 1 x B {1, 8, 64}; ``quick`` B {8, 64} x seq {128} plus
seq 1 x B {8}; ``tiny`` (CPU) B 8 x seq 16 plus seq 1 x B 8. Once per shape and k, outside the
timed region, the mixed output is checked against the sequential one, row by row.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import doe
from benchmarks import harness
from benchmarks.suites import GOAL_KEEP, MIXED_MODEL
from benchmarks.models import ModelCfg, cpu_models, gpu_models, model_inputs, build_model, make_expert
from doe.testing import gathered_wrappers
from doe_kernels.env import synchronize
from doe_kernels.segments import TokenGroups, choose_path
from doe_kernels.testing import rel_err

TASKS = [1, 2, 4, 8]
# sweep -> (batches, seqs, decode batches)
SWEEPS = {
    "tiny": ([8], [16], [8]),
    "quick": ([8, 64], [128], [8]),
    "campaign": ([16], [128], [16]),
    "full": ([8, 16, 64], [128, 512], [1, 8, 64]),
}
_TOL = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}


@dataclass(frozen=True)
class MixedCase:
    cfg: ModelCfg
    batch: int
    seq: int
    tasks: Optional[int]  # None for dense and single: the same for every k (the report broadcasts them)
    variant: str

    @property
    def id(self) -> str:
        k = "" if self.tasks is None else f"-k{self.tasks}"
        return f"{self.cfg.name}-b{self.batch}-s{self.seq}{k}-{self.cfg.dtype}-{self.variant}"


def _models(sweep: str) -> dict:
    models = cpu_models() if sweep == "tiny" else gpu_models()
    only = [m.strip() for m in os.environ.get("DOE_BENCH_MODELS", "").split(",") if m.strip()]
    return {k: v for k, v in models.items() if not only or k in only or k.split("-")[0] in only}


def _cases() -> list:
    sweep = harness.sweep_name()
    batches, seqs, decode = SWEEPS[sweep]
    out = []
    for cfg in _models(sweep).values():
        shapes = [(b, s) for b in batches for s in seqs if s <= cfg.max_pos]
        if cfg.family == "llama":
            shapes = [(b, 1) for b in decode] + shapes
        for b, s in sorted(shapes, key=lambda bs: (bs[0] * bs[1], bs[1])):
            cases = [MixedCase(cfg, b, s, None, v) for v in ("dense", "single")]
            cases += [MixedCase(cfg, b, s, k, v) for k in TASKS if k <= b for v in ("mixed", "sequential")]
            out += [pytest.param(c, id=c.id) for c in cases]
    return out


class _Bundle:
    """One model and its experts, kept while the model's cases run."""

    def __init__(self, cfg: ModelCfg, device: torch.device):
        self.model = build_model(cfg, device)
        self.experts = [make_expert(self.model, GOAL_KEEP, seed=i + 1) for i in range(max(TASKS))]
        self.checked: set = set()


_BUNDLES: dict = {}


def _bundle(cfg: ModelCfg, device: torch.device) -> _Bundle:
    if cfg.name not in _BUNDLES:
        for old in _BUNDLES.values():
            doe.restore_(old.model)
        _BUNDLES.clear()
        _BUNDLES[cfg.name] = _Bundle(cfg, device)
    return _BUNDLES[cfg.name]


def _calls(b: _Bundle, case: MixedCase, inputs: dict):
    """(call, prepare): the timed forward of the variant and what puts the model in its state."""
    model, k = b.model, case.tasks or 1
    names = [f"t{i}" for i in range(k)]
    mapping = dict(zip(names, b.experts))
    tasks = [names[i % k] for i in range(case.batch)]
    parts = [{key: (v[i::k] if isinstance(v, torch.Tensor) else v) for key, v in inputs.items()} for i in range(k)]

    def dense():
        return model(**inputs)

    def mixed():
        with doe.mixed_batch(model, tasks):
            return model(**inputs)

    def sequential():
        outs = []
        for expert, part in zip(b.experts, parts):
            doe.unplug_(model, expert)
            outs.append(model(**part))
        return outs

    prepare = {
        "dense": lambda: doe.restore_(model),
        "single": lambda: doe.unplug_(model, b.experts[0]),
        "mixed": lambda: doe.unplug_(model, mapping),
        "sequential": lambda: doe.unplug_(model, b.experts[0]),
    }[case.variant]
    call = {"dense": dense, "single": dense, "mixed": mixed, "sequential": sequential}[case.variant]
    return call, prepare, mixed, sequential


@pytest.mark.parametrize("case", _cases())
def test_mixed_forward(benchmark, case: MixedCase, bench_device, device_info):
    dev, cfg = bench_device, case.cfg
    b = _bundle(cfg, dev)
    inputs = model_inputs(cfg, case.batch, case.seq, dev)
    call, prepare, mixed, sequential = _calls(b, case, inputs)

    info = benchmark.extra_info
    info.update(device_info)
    info.update(MIXED_MODEL.extra_info(case.variant, model=cfg.name, dtype=cfg.dtype, keep=GOAL_KEEP,
                                       batch=case.batch, seq=case.seq, tasks=case.tasks),
                note=cfg.note, layers=cfg.layers, hidden=cfg.hidden, inter=cfg.inter,
                regime="decode-like (seq 1, no KV cache)" if case.seq == 1 else "prefill / encoder")
    benchmark.group = f"mixed-{cfg.name}-b{case.batch}-s{case.seq}-{cfg.dtype}"

    key = (case.batch, case.seq, case.tasks)
    with torch.inference_mode():
        if case.tasks is not None and key not in b.checked:  # outside the timed region: mixed rows equal their task's sub-batch
            b.checked.add(key)
            doe.unplug_(b.model, dict(zip([f"t{i}" for i in range(case.tasks)], b.experts)))
            got = mixed().last_hidden_state
            seq = sequential()
            want = torch.empty_like(got)
            for i, part in enumerate(seq):
                want[i::case.tasks] = part.last_hidden_state
            err = rel_err(got, want)
            info["max_rel_err_vs_sequential"] = err
            assert math.isfinite(err) and err <= _TOL[cfg.dtype], f"mixed vs sequential: rel err {err:.3g}"
        prepare()
    if case.variant == "mixed":  # what the first FFN block runs (choose_path)
        grouped = next(w.mixed[0] for w in gathered_wrappers(b.model) if w.mixed is not None)
        rows = TokenGroups.build([i % case.tasks for i in range(case.batch)], grouped.num_groups,
                               rows_per_item=case.seq)
        info["path"] = choose_path(grouped, rows)
    synchronize(dev)
    rounds = int(os.environ.get("DOE_BENCH_MODEL_ROUNDS", 15 if dev.type == "cuda" else 10))
    harness.run_timed(benchmark, [call], dev, rounds=rounds)


def teardown_module(module):
    for b in _BUNDLES.values():
        doe.restore_(b.model)
    _BUNDLES.clear()
