"""Decode end to end: tokens/s of greedy generation, dense vs a task expert.

Suite ``generate`` (``benchmarks.report`` writes ``generate.md``). One round generates N new
tokens after a P-token prompt for a batch of B random prompts (prefill included); the time per
call is the round's time / N, so tokens/s = B / time per call. Variants:

- ``dense``:    the model as built (timed once per shape: ``keep`` None).
- ``sliced``:   a copy whose FFN layers hold copies of the kept weights (the speed bar).
- ``gathered``: a second copy of the model under ``doe.unplug_`` (no weight copied).

Modes (``mode``), each a way users run a decoder:

- ``generate``: Hugging Face ``model.generate`` (a DynamicCache, one Python-driven forward per
  token): what a plain program gets.
- ``graph`` (CUDA): ``benchmarks.decode.StaticDecoder``: an eager prefill into a StaticCache,
  then one CUDA-graph replay per token (no Python or launch overhead: what CUDA graphs or
  torch.compile's reduce-overhead give).
- ``static``: the same loop without the graph (the CPU stand-in for ``graph``).
- ``compile`` (only when asked): ``generate(cache_implementation="static")``, which on CUDA
  compiles the one-token step with ``torch.compile(mode="reduce-overhead")``; each variant
  compiles (minutes on a 7B-shaped model).

Models (DOE_BENCH_GEN_MODELS): ``llama7b``: LlamaForCausalLM with LLaMA-7B's shape (hidden
4096, FFN 11008, 32 heads, 32 layers, vocabulary 32000, untied LM head; DOE_BENCH_GEN_LAYERS
changes the layer count); ``smollm2``: SmolLM2-135M-Instruct's shape (hidden 576, FFN 1536, 9
heads, 3 KV heads, 30 layers, vocabulary 49152, LM head tied to the embedding). Random weights,
bf16 on CUDA. CPU: ``llama-small`` with an LM head, fp32 (a smoke run). Before timing, each
variant's prefill logits are checked against the sliced copy's (gathered) or ``generate()``'s
tokens against the decoder's (graph / static).

``ideal_speedup`` is the decode step's Amdahl bound: a step is weight-bandwidth-bound, so it is
the bytes a dense step reads (every weight but the input embedding, unless the LM head is tied
to it, plus the KV cache at the mean context P + N / 2) over the bytes the expert's step reads
(the FFN weights times keep).

Environment (besides harness.py's): DOE_BENCH_GEN_MODELS (comma list; default ``llama7b`` on
CUDA), DOE_BENCH_GEN_MODES (comma list; default ``graph,generate`` on CUDA, ``static,generate`` on
CPU), DOE_BENCH_GEN_BATCHES (default ``1,16``; CPU ``1,4``), DOE_BENCH_GEN_KEEPS (default
``0.35``), DOE_BENCH_GEN_PROMPT (default 128; CPU 16), DOE_BENCH_GEN_NEW (new tokens, default 128;
CPU 16; per mode as ``graph:128,generate:32``), DOE_BENCH_GEN_LAYERS (default 32),
DOE_BENCH_GEN_ROUNDS (default 5 for ``graph``, else 3).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
import torch.nn as nn

import doe
from benchmarks import harness
from benchmarks.decode import StaticDecoder, hf_generate
from benchmarks.suites import GENERATE, GOAL_KEEP
from benchmarks.models import (ModelCfg, build_model, causal_lm_models, cpu_models, ffn_weight_bytes, make_expert,
                               step_weight_bytes)
from doe.testing import sliced_copy
from doe_kernels.env import synchronize
from doe_kernels.testing import rel_err

MODES = ("generate", "graph", "static", "compile")
_TOL = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}


def _env_list(name: str, default: str) -> list:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def _model_cfgs(device: torch.device) -> list:
    """The models DOE_BENCH_GEN_MODELS names, in that order (one on CPU: a smoke run)."""
    if device.type != "cuda":
        return [replace(cpu_models()["llama-small"],
                        note="small LlamaForCausalLM (hidden 512, FFN 2048, 4 layers), random weights, fp32 "
                             "(CPU smoke run)")]
    known = causal_lm_models()
    names = _env_list("DOE_BENCH_GEN_MODELS", "llama7b")
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"DOE_BENCH_GEN_MODELS: expected some of {', '.join(known)}, got {names}")
    return [known[n] for n in names]


def _new_tokens(spec: str, modes: list) -> dict:
    """``"128"`` (every mode) or ``"graph:128,generate:32"`` -> {mode: new tokens}."""
    if ":" not in spec:
        return {m: int(spec) for m in modes}
    per = {k.strip(): int(v) for k, v in (item.split(":", 1) for item in spec.split(",") if item.strip())}
    missing = [m for m in modes if m not in per]
    if missing:
        raise ValueError(f"DOE_BENCH_GEN_NEW: no token count for mode(s) {missing} in {spec!r}")
    return per


def _settings(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    modes = _env_list("DOE_BENCH_GEN_MODES", "graph,generate" if cuda else "static,generate")
    bad = [m for m in modes if m not in MODES or (m in ("graph", "compile") and not cuda)]
    if bad:
        raise ValueError(f"DOE_BENCH_GEN_MODES: expected some of {MODES} (graph and compile need CUDA), got {bad}")
    keeps = [float(k) for k in _env_list("DOE_BENCH_GEN_KEEPS", str(GOAL_KEEP))]
    if not keeps or any(not 0.0 < k < 1.0 for k in keeps):
        raise ValueError(f"DOE_BENCH_GEN_KEEPS: expected keep ratios in (0, 1), got {keeps}")
    return {
        "modes": modes,
        "batches": [int(b) for b in _env_list("DOE_BENCH_GEN_BATCHES", "1,16" if cuda else "1,4")],
        "keeps": keeps,
        "prompt": int(os.environ.get("DOE_BENCH_GEN_PROMPT", 128 if cuda else 16)),
        "new": _new_tokens(os.environ.get("DOE_BENCH_GEN_NEW", "128" if cuda else "16"), modes),
        "rounds": os.environ.get("DOE_BENCH_GEN_ROUNDS"),
    }


@dataclass(frozen=True)
class GenCase:
    cfg: ModelCfg
    mode: str
    batch: int
    keep: Optional[float]  # None for dense
    variant: str

    @property
    def id(self) -> str:
        k = "" if self.keep is None else f"-keep{self.keep:g}"
        return f"{self.cfg.name}-{self.mode}-b{self.batch}{k}-{self.variant}"


def _cases() -> list:
    """Model outermost (one model on the device at a time), then mode (the first is the headline:
    a run cut by DOE_BENCH_BUDGET_S keeps it), batch, keep."""
    dev = harness.bench_device()
    s = _settings(dev)
    out = []
    for cfg in _model_cfgs(dev):
        for mode in s["modes"]:
            for b in s["batches"]:
                cases = [GenCase(cfg, mode, b, None, "dense")]
                cases += [GenCase(cfg, mode, b, k, v) for k in s["keeps"] for v in ("sliced", "gathered")]
                out += [pytest.param(c, id=c.id) for c in cases]
    return out


def decode_ideal(model: nn.Module, cfg: ModelCfg, keep: float, batch: int, context: float) -> dict:
    """The decode step's Amdahl bound from bytes read per step (see the module docstring)."""
    es = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    kv = 2 * cfg.layers * batch * cfg.kv_heads * (cfg.hidden // cfg.heads) * context * es
    ffn = ffn_weight_bytes(model)
    dense = step_weight_bytes(model) + kv
    return {"ffn_share": round(ffn / dense, 4), "ideal_speedup": round(dense / (dense - ffn * (1.0 - keep)), 4),
            "ideal_basis": "bytes per decode step (weights + KV cache)"}


class _State:
    """The dense model, a gathered copy (switched between experts) and a sliced copy per keep
    ratio, built once per model."""

    def __init__(self, cfg: ModelCfg, device: torch.device, keeps: list):
        self.cfg, self.device = cfg, device
        self.dense = build_model(cfg, device, lm_head=True)
        self.experts = {k: make_expert(self.dense, k) for k in keeps}
        self.gathered = build_model(cfg, device, lm_head=True)  # same seed: the same weights
        self.sliced = {k: sliced_copy(self.dense, e.indices).eval() for k, e in self.experts.items()}
        self.checked: set = set()

    def model(self, variant: str, keep: Optional[float]) -> nn.Module:
        if variant == "gathered":
            return doe.unplug_(self.gathered, self.experts[keep])  # install, or switch experts
        return self.dense if variant == "dense" else self.sliced[keep]


_STATE: dict = {}


def _state(cfg: ModelCfg, device: torch.device, keeps: list) -> _State:
    if cfg.name not in _STATE:
        _STATE.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _STATE[cfg.name] = _State(cfg, device, keeps)
    return _STATE[cfg.name]


def _prompt(cfg: ModelCfg, batch: int, prompt: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 7919 + prompt)
    return torch.randint(3, cfg.vocab, (batch, prompt), generator=g).to(device)


def _check(st: _State, case: GenCase, ids: torch.Tensor, info: dict) -> None:
    """Once per keep ratio: the gathered model's logits match the sliced copy's."""
    if case.variant != "gathered" or case.keep in st.checked:
        return
    st.checked.add(case.keep)
    with torch.inference_mode():
        out = st.model("gathered", case.keep)(input_ids=ids).logits
        ref = st.sliced[case.keep](input_ids=ids).logits
    err = rel_err(out, ref)
    info["max_rel_err_vs_sliced"] = err
    assert math.isfinite(err) and err <= _TOL[st.cfg.dtype], f"gathered vs sliced logits: rel err {err:.3g}"


def _static_generate(model: nn.Module, ids: torch.Tensor, new: int):
    """``generate()`` over a StaticCache: on CUDA, Hugging Face compiles the one-token step with
    torch.compile(mode="reduce-overhead") (CUDA graphs) on the first call."""
    def run():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0,
                              cache_implementation="static")[:, ids.shape[1]:]

    return run


@pytest.mark.parametrize("case", _cases())
def test_generate(benchmark, case: GenCase, bench_device, device_info):
    dev = bench_device
    s = _settings(dev)
    cfg = case.cfg
    st = _state(cfg, dev, s["keeps"])
    model = st.model(case.variant, case.keep)
    ids = _prompt(cfg, case.batch, s["prompt"], dev)
    new = s["new"][case.mode]

    info = benchmark.extra_info
    info.update(device_info)
    info.update(
        GENERATE.extra_info(case.variant, model=cfg.name, dtype=cfg.dtype, keep=case.keep, batch=case.batch,
                            prompt=s["prompt"], new_tokens=new, mode=case.mode),
        layers=cfg.layers, hidden=cfg.hidden, inter=cfg.inter, note=cfg.note,
        **decode_ideal(st.dense, cfg, case.keep or GOAL_KEEP, case.batch, s["prompt"] + new / 2),
    )
    benchmark.group = f"generate-{cfg.name}-{case.mode}-b{case.batch}"
    _check(st, case, ids, info)

    timing = case.mode
    if case.mode in ("graph", "static"):
        decoder = StaticDecoder(model, case.batch, s["prompt"], new, graph=case.mode == "graph")
        try:
            decoder.prepare(ids)
        except Exception as exc:  # noqa: BLE001 - a failed capture is a result too: say so and time eagerly
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            decoder = StaticDecoder(model, case.batch, s["prompt"], new, graph=False)
            decoder.prepare(ids)
            timing = f"static, eager (graph capture failed: {type(exc).__name__}: {exc})"[:200]
            info["capture_failed"] = f"{case.variant}, batch {case.batch}: {type(exc).__name__}: {exc}"[:200]
        run = lambda: decoder.run(ids)  # noqa: E731
        # fp32: every token must match generate(); 16-bit: a near-tie may flip one argmax and the rest
        # follows, so the agreement is only recorded, and only at batch 1 for dense and the first keep
        # ratio's gathered model (an eager 7B-shaped generate() takes seconds)
        if cfg.dtype == "fp32" or (case.batch == 1 and case.keep in (None, s["keeps"][0]) and case.variant != "sliced"):
            with torch.inference_mode():
                got = run().clone()
                want = hf_generate(model, ids, new)
            agree = (got == want).float().mean().item()
            info["tokens_agree_with_generate"] = round(agree, 4)
            if cfg.dtype == "fp32":
                assert agree == 1.0, f"{case.mode} decoding differs from generate() on {1 - agree:.1%} of tokens"
    elif case.mode == "compile":
        run = _static_generate(model, ids, new)
    else:
        run = lambda: hf_generate(model, ids, new)  # noqa: E731

    def timed():
        with torch.inference_mode():
            out = run()
        synchronize(dev)
        return out

    out = timed()  # warm-up: Triton autotuning, cuBLAS heuristics, compilation
    assert tuple(out.shape) == (case.batch, new), f"generated {tuple(out.shape)}, expected {(case.batch, new)}"
    # an eager 7B-shaped round is seconds long: fewer of them
    rounds = int(s["rounds"] or (5 if dev.type == "cuda" and case.mode == "graph" else 3))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)  # warmed up just above
    median = benchmark.stats.stats.median
    info.update(inner=new, rounds=rounds, warmup_rounds=0, timing=timing,
                tokens_per_s=round(case.batch * new / median, 2), ms_per_token_step=round(median / new * 1e3, 3))


def teardown_module(module):
    _STATE.clear()
    gc.collect()
    if harness.bench_device().type == "cuda":
        torch.cuda.empty_cache()
