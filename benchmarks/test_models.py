"""Model-level benchmarks: a whole transformer with a task expert, and what switching costs.

Two suites (``extra_info["suite"]``), both read by ``benchmarks.report``:

``model`` -- forward latency of one model under five variants:

- ``dense``:    the model as it is (all FFN neurons).
- ``masked``:   a copy whose dropped neurons' up / gate rows (and biases) and down columns are
                zeroed: the same math as the expert, the same FLOPs as dense.
- ``sliced``:   a copy whose FFN layers are new, smaller nn.Linear holding copies of the kept
                rows / columns (the speed bar: cuBLAS on contiguous weights).
- ``sliced-pad16``: the same with each FFN width rounded up to a multiple of 16 with zero
                neurons (cuBLAS often picks faster kernels for aligned widths); the report's
                bar is the faster of the two. Skipped where every width is a multiple already.
- ``gathered``: the original model under ``doe.unplug_`` (no weight copied; Triton gathered
                kernels on CUDA, the index_select reference on CPU).
- ``compact``:  the original model under ``doe.unplug_(..., compact=True)``: compacted copies
                of the kept weights, made once per expert (memory for speed, reported as
                ``compact_weight_bytes``).

Swept: keep ratio {1.0, 0.5, 0.35, 0.2} x batch x sequence length (and, for the decoder, a
decode-like seq=1 step without a KV cache). ``dense`` does not depend on the keep ratio: it is
timed once per shape (``keep`` None) and the report puts it in every keep row. At keep 1.0
masked and sliced are the dense model itself, so only gathered runs there (its gather
overhead). Models have random weights (timing does not depend on them):

- CUDA: ``bert-base`` (BertModel, hidden 768, FFN 3072, 12 layers, fp16; position table
  raised to 2048 so seq 2048 runs) and ``llama7b-4L`` (LlamaModel with LLaMA-7B-shaped
  layers: hidden 4096, FFN 11008, 32 heads, but 4 of the 32 layers and no LM head, bf16).
  The FFN's share of a layer is the same as in the full model; the per-call time is not.
- CPU: tiny configs, fp32 (a smoke run, not a result).

Sweeps (DOE_BENCH_SWEEP, see harness.py): ``full`` (CUDA default) batch {1, 8, 64} x seq
{128, 512, 2048}, LLaMA capped at 32768 tokens (no b64 x s2048), plus seq 1 x batch {1, 8, 64};
``quick`` batch {1, 8} x seq {128, 512} (+ seq 1), keep {1.0, 0.35}; ``campaign`` batch {1, 8}
x seq {128, 2048} plus seq 1 x batch {1, 16}, keep {0.35, 0.2, 1.0}; ``tiny`` (CPU default)
batch {1, 4} x seq {16, 128} (+ seq 1). Cases run in one pass per keep ratio, 0.35 first (then
1.0, 0.2, 0.5), so a run cut by DOE_BENCH_BUDGET_S keeps the goal's ratio for every shape.

``switch`` -- what it costs to move between experts on a LLaMA-7B-shaped model (all 32
layers on CUDA, bf16, ~13 GB; DOE_BENCH_SWITCH_LAYERS to change): time (median of rounds) and
bytes of

- ``unplug-first``:  first install; includes re-storing every down projection neuron-major
                     (a one-time, in-place conversion: weight bytes move, none stay allocated);
- ``switch``:        expert A -> B while installed (an index-buffer swap);
- ``restore``:       back to the original modules;
- ``unplug``:        install again after a restore (the conversion is not repeated);
- ``sliced-build``:  the slicing alternative: build sliced FFN layers for one expert (copies of
                     the kept weights) and swap them in, originals kept for restore;
- ``sliced-copy``:   a separate sliced model for one expert (non-FFN weights copied too).

Bytes: on CUDA ``torch.cuda.memory_stats`` (``allocated_bytes.all.current`` delta and peak
over the op); on both, the bytes of weight storages that are new after the op (by data_ptr)
and whether every original parameter still has its data_ptr.

Environment (besides harness.py's): DOE_BENCH_MODELS (comma list of model names or families
to run, e.g. ``llama7b-4L`` or ``bert``),
DOE_BENCH_LLAMA_LAYERS (default 4), DOE_BENCH_SWITCH_LAYERS (default 32),
DOE_BENCH_MODEL_ROUNDS (timed rounds per forward case; default 15 on CUDA, 10 on CPU).
"""

from __future__ import annotations

import copy
import gc
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn

import doe
from benchmarks import harness
from benchmarks.models import (ModelCfg, amdahl, build_model, cpu_models, ffn_weight_bytes, gpu_models, make_expert,
                               masked_copy, model_inputs, nbytes)
from benchmarks.suites import GOAL_KEEP, MODEL, PAD, SWITCH
from doe.testing import sliced_copy, sliced_ffn_modules
from doe_kernels import is_neuron_major, to_row_major_
from doe_kernels.env import parse_dtype, synchronize
from doe_kernels.testing import rel_err

KEEP_ORDER = [1.0, 0.5, 0.35, 0.2]


def _switch_model(device: torch.device) -> ModelCfg:
    if harness.sweep_name(device) == "tiny":
        return ModelCfg("llama-small-8L", "llama", 256, 688, 8, 4, 4, 512, 128, "fp32",
                        note="small LlamaModel (hidden 256, FFN 688, 8 layers), fp32 (CPU smoke run)")
    n = int(os.environ.get("DOE_BENCH_SWITCH_LAYERS", 32))
    return ModelCfg(f"llama7b-{n}L", "llama", 4096, 11008, n, 32, 32, 32000, 4096, "bf16",
                    note=f"LlamaModel, LLaMA-7B shape (hidden 4096, FFN 11008, 32 heads, {n} of 32 layers), "
                         "random weights, bf16, no LM head")


# sweep -> (batches, seqs, decode batches (llama, seq=1), keeps)
SWEEPS = {
    "tiny": ([1, 4], [16, 128], [1, 4], KEEP_ORDER),
    "quick": ([1, 8], [128, 512], [1, 8], [1.0, 0.35]),
    "campaign": ([1, 8], [128, 2048], [1, 16], [0.35, 0.2, 1.0]),
    "full": ([1, 8, 64], [128, 512, 2048], [1, 8, 64], KEEP_ORDER),
}
SWITCH_KEEPS = [0.35]


def _models_for(sweep: str) -> dict:
    models = cpu_models() if sweep == "tiny" else gpu_models()
    only = [m.strip() for m in os.environ.get("DOE_BENCH_MODELS", "").split(",") if m.strip()]
    if only:
        models = {k: v for k, v in models.items() if k in only or k.split("-")[0] in only}
    return models


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FwdCase:
    cfg: ModelCfg
    batch: int
    seq: int
    keep: Optional[float]  # None for dense
    variant: str

    @property
    def id(self) -> str:
        k = "" if self.keep is None else f"-keep{self.keep:g}"
        return f"{self.cfg.name}-b{self.batch}-s{self.seq}{k}-{self.cfg.dtype}-{self.variant}"


#: keep ratios in the order they run: the goal's ratio first, so that a run cut short by
#: DOE_BENCH_BUDGET_S still holds it for every model and shape (the report sorts them back)
KEEP_PRIORITY = [GOAL_KEEP, 1.0, 0.2, 0.5]


def _shapes(cfg: ModelCfg, batches: list, seqs: list, decode_batches: list) -> list:
    shapes = [(b, s) for b in batches for s in seqs]
    if cfg.family == "llama":
        shapes = [(b, 1) for b in decode_batches] + shapes
    shapes = [(b, s) for b, s in shapes if s <= cfg.max_pos and (cfg.max_tokens is None or b * s <= cfg.max_tokens)]
    return sorted(shapes, key=lambda bs: (bs[0] * bs[1], bs[1]))


def _fwd_cases() -> list:
    """One pass per keep ratio (KEEP_PRIORITY order), each over every model and shape (small to
    large); dense runs in the first pass. A run cut by DOE_BENCH_BUDGET_S loses whole keep
    ratios, not the large shapes."""
    sweep = harness.sweep_name()
    batches, seqs, decode_batches, keeps = SWEEPS[sweep]
    keeps = sorted(keeps, key=lambda k: KEEP_PRIORITY.index(k) if k in KEEP_PRIORITY else len(KEEP_PRIORITY))
    models = list(_models_for(sweep).values())
    out = []
    for pass_no, keep in enumerate(keeps):
        for cfg in models:
            for b, s in _shapes(cfg, batches, seqs, decode_batches):
                cases = [FwdCase(cfg, b, s, None, "dense")] if pass_no == 0 else []
                variants = ["gathered"] if keep >= 1.0 else ["masked", "sliced", "sliced-pad16", "gathered", "compact"]
                cases += [FwdCase(cfg, b, s, keep, v) for v in variants]
                out += [pytest.param(c, id=c.id) for c in cases]
    return out


@dataclass(frozen=True)
class SwitchCase:
    op: str
    keep: float

    @property
    def id(self) -> str:
        return f"keep{self.keep:g}-{self.op}"


def _switch_cases() -> list:
    return [pytest.param(SwitchCase(op, k), id=SwitchCase(op, k).id) for k in SWITCH_KEEPS for op in SWITCH.variants]


class _Bundle:
    """One model config's variants, built lazily and kept while its cases run."""

    def __init__(self, cfg: ModelCfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.dense = build_model(cfg, device)
        self.gathered = copy.deepcopy(self.dense)  # unplugged; dense keeps its original layout
        self.experts: dict = {}
        self.masked: dict = {}
        self.sliced: dict = {}
        self.padded: dict = {}
        self.checked: set = set()
        self.n_params = sum(p.numel() for p in self.dense.parameters())

    def expert(self, keep: float) -> doe.TaskExpert:
        if keep not in self.experts:
            self.experts[keep] = make_expert(self.dense, keep)
        return self.experts[keep]

    def model(self, variant: str, keep: Optional[float]) -> nn.Module:
        if variant == "dense":
            return self.dense
        if variant in ("gathered", "compact"):  # install, or switch experts
            doe.unplug_(self.gathered, self.expert(keep), compact=variant == "compact")
            return self.gathered
        store, make = {"masked": (self.masked, masked_copy), "sliced": (self.sliced, sliced_copy),
                       "sliced-pad16": (self.padded, lambda m, idx: sliced_copy(m, idx, pad_to=PAD))}[variant]
        if keep not in store:
            store.clear()  # one keep ratio at a time: a 7B-shaped copy is big
            gc.collect()
            store[keep] = make(self.dense, self.expert(keep).indices).eval()
        return store[keep]


_CURRENT: dict = {}


def _free_bundles(device: torch.device, keep_prefix: Optional[str] = None) -> None:
    for key in list(_CURRENT):
        if keep_prefix is not None and key.startswith(keep_prefix):
            continue
        b = _CURRENT.pop(key)
        if isinstance(b, _Bundle):
            doe.restore_(b.gathered)
            doe.release_compact(b.gathered)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bundle(key: str, make: Callable[[], Any], device: torch.device):
    """Bundles of one kind ("model:" or "switch:") stay alive together (the forward suite's keep
    passes alternate between its models); asking for the other kind frees them (the switch
    suite's 7B-shaped model is ~13 GB)."""
    if key not in _CURRENT:
        _free_bundles(device, keep_prefix=key.split(":", 1)[0] + ":")
        _CURRENT[key] = make()
    return _CURRENT[key]


_TOL = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}


# --------------------------------------------------------------------------------------------
# switch-cost helpers
# --------------------------------------------------------------------------------------------


def _storages(tensors) -> dict:
    """data_ptr -> (bytes, floating) of the distinct storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        out[s.data_ptr()] = (s.nbytes(), t.is_floating_point())
    return out


def _model_tensors(model: nn.Module) -> list:
    return list(model.parameters()) + list(model.buffers())


class _SwitchState:
    """The switch-suite model, two experts, and the sliced-swap bookkeeping."""

    def __init__(self, cfg: ModelCfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, device)
        self.blocks = doe.find_ffn_blocks(self.model)
        self.experts: dict = {}
        self.sliced_swapped: list = []  # (parent, attr, original) while sliced layers are in
        self.holder: list = []  # keeps a sliced copy alive until the next setup
        self.ffn_bytes = ffn_weight_bytes(self.model)
        self.model_bytes = sum(nbytes(p) for p in self.model.parameters())

    def pair(self, keep: float) -> tuple:
        if keep not in self.experts:
            self.experts[keep] = (make_expert(self.model, keep, seed=1), make_expert(self.model, keep, seed=2))
        return self.experts[keep]

    # states -------------------------------------------------------------------------------
    def clean(self) -> None:
        """Original modules in place, nothing sliced, no copy alive."""
        had = bool(self.holder or self.sliced_swapped)
        self.holder.clear()
        self.unslice()
        doe.restore_(self.model)
        if had:  # a sliced copy of a 7B-shaped model is GBs: free it before the next round
            gc.collect()

    def row_major(self) -> None:
        """Undo the neuron-major conversion so the next unplug is a first one again."""
        self.clean()
        for b in self.blocks:
            to_row_major_(b.down.weight)

    def unslice(self) -> None:
        for parent, attr, original in reversed(self.sliced_swapped):
            setattr(parent, attr, original)
        self.sliced_swapped.clear()

    def slice_in(self, expert: doe.TaskExpert) -> None:
        """The slicing alternative to unplug_: sliced copies of the kept FFN weights swapped in."""
        self.unslice()
        new = sliced_ffn_modules(self.model, expert.indices)
        for b in self.blocks:
            for name, layer in ((b.up_name, b.up), (b.gate_name, b.gate), (b.down_name, b.down)):
                if layer is None:
                    continue
                head, _, attr = name.rpartition(".")
                parent = b.container.get_submodule(head) if head else b.container
                setattr(parent, attr, new[id(layer)])
                self.sliced_swapped.append((parent, attr, layer))


def _op_fns(st: _SwitchState, op: str, keep: float) -> tuple:
    """(setup, target, label) for one switch-suite op. setup leaves the state the op starts
    from (it is not timed); target is the op itself."""
    a, b = st.pair(keep)
    m = st.model

    def installed_a():
        st.holder.clear()
        st.unslice()
        if doe.current_expert(m) is not a:
            doe.unplug_(m, a)

    def restored_converted():
        st.clean()
        if st.device.type == "cuda" and not all(is_neuron_major(bl.down.weight, 1) for bl in st.blocks):
            doe.unplug_(m, a)  # the one-time conversion, so that the timed unplug does not include it
            doe.restore_(m)

    if op == "unplug-first":
        return st.row_major, lambda: doe.unplug_(m, a), "first install (re-stores down projections neuron-major on CUDA)"
    if op == "switch":
        return installed_a, lambda: doe.unplug_(m, b), "expert A -> expert B while installed (index swap)"
    if op == "restore":
        return installed_a, lambda: doe.restore_(m), "back to the original modules"
    if op == "unplug":
        return restored_converted, lambda: doe.unplug_(m, a), "install after a restore (no conversion)"
    if op == "sliced-build":
        return st.clean, lambda: st.slice_in(a), "build + swap in sliced FFN layers for one expert"
    if op == "sliced-copy":
        return st.clean, lambda: st.holder.append(sliced_copy(m, a.indices)), "a separate sliced model for one expert"
    raise ValueError(op)


def _resident(st: _SwitchState) -> dict:
    """Storages held by the model, by original layers swapped out for sliced ones, and by a
    sliced copy (if one is alive)."""
    tensors = _model_tensors(st.model)
    for _, _, original in st.sliced_swapped:
        tensors += _model_tensors(original)
    for extra in st.holder:
        tensors += _model_tensors(extra)
    return _storages(tensors)


def _probe_bytes(st: _SwitchState, setup: Callable, target: Callable) -> dict:
    """Run setup + target once (untimed) and account for what the op allocated: storages that
    are new afterwards (weights vs index buffers), the resident-bytes delta, whether every
    original parameter still points at the same memory, and on CUDA the allocator's view."""
    dev = st.device
    setup()
    gc.collect()
    synchronize(dev)
    before = _resident(st)
    params = list(st.model.parameters())
    ptrs = [p.data_ptr() for p in params]
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        s0 = torch.cuda.memory_stats(dev)["allocated_bytes.all.current"]
    target()
    synchronize(dev)
    if cuda:
        stats = torch.cuda.memory_stats(dev)
    after = _resident(st)
    new = [v for k, v in after.items() if k not in before]
    gone = [v for k, v in before.items() if k not in after]
    out = {
        "weight_bytes_new": sum(n for n, fl in new if fl),
        "index_bytes_new": sum(n for n, fl in new if not fl),
        "resident_bytes_before": sum(n for n, _ in before.values()),
        "resident_bytes_delta": sum(n for n, _ in new) - sum(n for n, _ in gone),
        "weights_untouched": all(p.data_ptr() == ptr for p, ptr in zip(params, ptrs)),
    }
    if cuda:
        out["alloc_delta_bytes"] = stats["allocated_bytes.all.current"] - s0
        out["peak_delta_bytes"] = stats["allocated_bytes.all.peak"] - s0
    return out


# --------------------------------------------------------------------------------------------
# the benchmarks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _switch_cases())
def test_switch_cost(benchmark, case: SwitchCase, bench_device, device_info):
    dev = bench_device
    cfg = _switch_model(dev)
    st = _bundle(f"switch:{cfg.name}", lambda: _SwitchState(cfg, dev), dev)
    setup, target, label = _op_fns(st, case.op, case.keep)
    expert_a, _ = st.pair(case.keep)

    info = benchmark.extra_info
    info.update(device_info)
    probed = _probe_bytes(st, setup, target)
    kept_bytes = sum(
        len(idx) * (3 if cfg.gated else 2) * cfg.hidden * torch.empty((), dtype=parse_dtype(cfg.dtype)).element_size()
        for idx in expert_a.indices
    )
    info.update(
        SWITCH.extra_info(case.op, model=cfg.name, keep=case.keep),
        op=case.op,
        op_label=label,
        note=cfg.note,
        dtype=cfg.dtype,
        layers=cfg.layers,
        hidden=cfg.hidden,
        inter=cfg.inter,
        ffn_blocks=len(st.blocks),
        model_weight_bytes=st.model_bytes,
        ffn_weight_bytes=st.ffn_bytes,
        kept_ffn_weight_bytes=kept_bytes,
        expert_index_bytes=sum(nbytes(i) for i in expert_a.indices),
        **probed,
    )
    benchmark.group = f"switch-{cfg.name}-keep{case.keep:g}"

    def timed():
        target()
        synchronize(dev)

    def setup_synced():
        setup()
        synchronize(dev)

    heavy = case.op in ("unplug-first", "sliced-copy", "sliced-build")
    if dev.type == "cuda":
        rounds, warmup = (10, 1) if heavy else (50, 3)
    else:
        rounds, warmup = (5, 1) if heavy else (20, 2)
    benchmark.pedantic(timed, setup=setup_synced, rounds=rounds, warmup_rounds=warmup, iterations=1)
    info.update(inner=1, rounds=rounds, warmup_rounds=warmup, timing="eager (one op per round, setup untimed)")
    st.clean()


@pytest.mark.parametrize("case", _fwd_cases())
def test_model_forward(benchmark, case: FwdCase, bench_device, device_info):
    dev = bench_device
    cfg = case.cfg
    bundle: _Bundle = _bundle(f"model:{cfg.name}", lambda: _Bundle(cfg, dev), dev)
    if case.variant == "sliced-pad16" and all(len(i) % PAD == 0 for i in bundle.expert(case.keep).indices):
        pytest.skip(f"every kept width is a multiple of {PAD}: sliced-pad16 is sliced")
    model = bundle.model(case.variant, case.keep)
    inputs = model_inputs(cfg, case.batch, case.seq, dev)

    info = benchmark.extra_info
    info.update(device_info)
    info.update(
        MODEL.extra_info(case.variant, model=cfg.name, dtype=cfg.dtype, keep=case.keep, batch=case.batch,
                         seq=case.seq, tokens=case.batch * case.seq),
        family=cfg.family,
        layers=cfg.layers,
        hidden=cfg.hidden,
        inter=cfg.inter,
        heads=cfg.heads,
        params=bundle.n_params,
        note=cfg.note,
        regime="decode-like (seq 1, no KV cache)" if case.seq == 1 else "prefill / encoder",
        **amdahl(cfg, case.batch, case.seq, case.keep),
    )
    benchmark.group = f"{cfg.name}-b{case.batch}-s{case.seq}-{cfg.dtype}"

    # Once per (model, keep), outside the timed region: gathered and masked compute what the
    # sliced copy computes.
    checked = case.variant in ("gathered", "compact", "masked", "sliced-pad16") and case.keep is not None
    if checked and (case.variant, case.keep) not in bundle.checked:
        bundle.checked.add((case.variant, case.keep))
        ref_model = bundle.dense if case.keep >= 1.0 else bundle.model("sliced", case.keep)
        with torch.inference_mode():
            out = model(**inputs).last_hidden_state
            ref = ref_model(**inputs).last_hidden_state
        err = rel_err(out, ref)
        info["max_rel_err_vs_sliced"] = err
        assert math.isfinite(err) and err <= _TOL[cfg.dtype], f"{case.variant} vs sliced: rel err {err:.3g}"

    rounds = int(os.environ.get("DOE_BENCH_MODEL_ROUNDS", 15 if dev.type == "cuda" else 10))
    harness.run_timed(benchmark, [lambda: model(**inputs)], dev, rounds=rounds)
    if case.variant == "compact":
        info["compact_weight_bytes"] = doe.compact_memory(model)


def teardown_module(module):
    _free_bundles(harness.bench_device())
