"""The known suites' report specs: columns, ratios, checks and plots of ``kernels`` and ``model``,
and the custom renderer of ``switch``. Row keys and variants come from :mod:`benchmarks.suites`."""

from __future__ import annotations

from typing import Optional

from benchmarks.report.switch import render_switch
from benchmarks.report.tables import Check, InfoColumn, Ratio, SuiteSpec, Table, fmt_ratio, generic_spec
from benchmarks.suites import (GOAL_DECODE_ROOFLINE, GOAL_FRACTION, GOAL_IDEAL_FRACTION, GOAL_KEEP, GOAL_KERNEL_SLICED,
                               GENERATE, GOAL_MIXED, KERNELS, MIXED, MIXED_MODEL, MODEL, PAD, SWITCH, Suite)

__all__ = ["SUITES", "spec_for"]


def _spec(suite: Suite, **fields) -> SuiteSpec:
    """The spec of ``suite``: its name, row keys and variants, and ``fields``."""
    return SuiteSpec(name=suite.name, keys=list(suite.keys), variants=list(suite.variants), **fields)


def _roofline_s(info: dict, times: dict) -> Optional[float]:
    """Decode (M <= 16) lower bound: kept-weight bytes / device copy bandwidth."""
    if not _decode(info):
        return None
    bw, nbytes = info.get("copy_bw_GBps"), info.get("kept_weight_bytes")
    if not bw or not nbytes:
        return None
    return nbytes / (bw * 1e9)


def _decode(keys: dict) -> bool:
    return keys.get("M") is not None and keys["M"] <= 16


def _best_sliced_s(info: dict, times: dict) -> Optional[float]:
    """The strongest cuBLAS bar of a row: the faster of the sliced copy and its padded twin."""
    ts = [times.get(v) for v in ("sliced", "sliced-pad16") if times.get(v) is not None]
    return min(ts) if ts else None


def _kernel_summary(table: Table) -> list:
    """The two kernel goals (rows met, worst row) and how often padding made the bar faster."""
    lines = []
    for check, label in ((KERNELS_CHECKS[0], "gathered-triton within {t:g}x of cuBLAS on the best sliced copy"),
                         (KERNELS_CHECKS[1], "decode (M <= 16) within {t:g}x of the bandwidth roofline")):
        rows = [r for r in table.records if check.name in r["checks"]]
        if not rows:
            continue
        ok = sum(r["checks"][check.name] for r in rows)
        worst = max(rows, key=lambda r: r["ratios"][check.ratio])
        where = ", ".join(f"{k} {worst[k]}" for k in ("op", "shape", "M", "keep", "dtype"))
        lines.append(f"- goal: {label.format(t=check.threshold)}: met for {ok}/{len(rows)} rows; worst "
                     f"{check.ratio} {fmt_ratio(worst['ratios'][check.ratio])} ({where})")
    padded = [r for r in table.records if "pad16/sliced" in r["ratios"]]
    if padded:
        faster = sum(r["ratios"]["pad16/sliced"] < 0.97 for r in padded)
        lines.append(f"- the sliced copy padded to a multiple of {PAD} was at least 3% faster than the plain one in "
                     f"{faster}/{len(padded)} rows; `best sliced` is the faster of the two in every row")
    return lines


KERNELS_CHECKS = [
    Check(f"<= {GOAL_KERNEL_SLICED:g}x sliced", "triton/sliced", "<=", GOAL_KERNEL_SLICED,
          note=f"goal: gathered-triton at most {GOAL_KERNEL_SLICED:g}x cuBLAS on the best sliced copy"),
    Check(f"<= {GOAL_DECODE_ROOFLINE:g}x roofline", "triton/roofline", "<=", GOAL_DECODE_ROOFLINE, when=_decode,
          note=f"goal for M <= 16: at most {GOAL_DECODE_ROOFLINE:g}x kept-weight bytes / copy bandwidth"),
]


GATHERED = ("gathered-triton", "gathered-torch")

KERNELS_SPEC = _spec(
    KERNELS,
    title="Gathered GEMM kernels",
    split_by=["dtype", "keep"],
    sort_by_appearance=["keep"],
    derived={"best sliced": _best_sliced_s, "roofline": _roofline_s},
    ratios=[
        Ratio("triton/sliced", ("gathered-triton",), ("best sliced",),
              note=f"< 1: faster than cuBLAS on the best sliced copy (plain or padded to a multiple of {PAD})"),
        Ratio("pad16/sliced", ("sliced-pad16",), ("sliced",), note="< 1: padding the sliced width makes cuBLAS faster"),
        Ratio("triton/dense", ("gathered-triton",), ("dense",), note="< 1: faster than the unpruned op"),
        Ratio("torch/sliced", ("gathered-torch",), ("sliced",), note="the index_select reference vs the bar"),
        Ratio(
            "triton/roofline",
            ("gathered-triton",),
            ("roofline",),
            when=_decode,
            note="M <= 16 only; roofline = kept-weight bytes / device copy bandwidth (1.0 is the limit)",
        ),
    ],
    checks=KERNELS_CHECKS,
    summary=_kernel_summary,
    plot_x="M",
    plot_series=["shape", "keep", "dtype"],
    plot_facet="op",
    plot_panels=[
        Ratio("gathered / best sliced  (< 1 beats the sliced copy)", GATHERED, ("best sliced",)),
        Ratio("dense / gathered  (speed-up over dense)", ("dense",), GATHERED),
    ],
    notes=[
        "Times are medians per call in us (median round time / calls per round).",
        "up: rows gather on (I, H); down: cols gather on the neuron-major (H, I) weight; "
        "glu: fused act(gate) * up. dense: F.linear on the full weights; sliced: F.linear on "
        "pre-made contiguous sliced copies (the cuBLAS bar); sliced-pad16: the same with the width rounded "
        f"up to a multiple of {PAD} with zero neurons; best sliced: the faster of the two; "
        "gathered-torch: index_select + F.linear.",
    ],
)


def _ideal_s(info: dict, times: dict) -> Optional[float]:
    """The time an ideal expert would take: dense time / the Amdahl speed-up (``ideal_speedup``)."""
    dense, ideal = times.get("dense"), info.get("ideal_speedup")
    return dense / ideal if dense and ideal else None


def _pruned(keyd: dict) -> bool:
    return keyd.get("keep") is not None and keyd["keep"] < 1.0


def _median(xs: list) -> Optional[float]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _shape_txt(rec: dict) -> str:
    return f"b{rec.get('batch')} s{rec.get('seq')}"


def _model_summary(table: Table) -> list:
    lines = []
    models: dict = {}
    for rec in table.records:
        models.setdefault((rec.get("model"), rec.get("dtype")), []).append(rec)
    for (model, dtype), recs in models.items():
        note = next((r["info"].get("note") for r in recs if r["info"].get("note")), "")
        lines.append(f"- **{model}** ({dtype}): {note}" if note else f"- **{model}** ({dtype})")
        goal = [r for r in recs if r.get("keep") == GOAL_KEEP and "gathered/sliced" in r["ratios"]]
        if not goal:
            continue
        ok = [r for r in goal if r["checks"].get("within 10% of sliced")]
        gx = _median([r["ratios"].get("gathered x") for r in goal])
        sx = _median([r["ratios"].get("sliced x") for r in goal])
        worst = max(goal, key=lambda r: r["ratios"]["gathered/sliced"])
        lines.append(
            f"  - goal at keep {GOAL_KEEP:g} (gathered speed-up >= {GOAL_FRACTION:g} x the sliced copy's): "
            f"met for {len(ok)}/{len(goal)} shapes; median speed-up over dense: gathered "
            f"{fmt_ratio(gx)}x, sliced {fmt_ratio(sx)}x; worst gathered/sliced "
            f"{fmt_ratio(worst['ratios']['gathered/sliced'])} ({_shape_txt(worst)})"
        )
        ideal = [r for r in goal if "of ideal" in r["ratios"]]
        if ideal:
            met = [r for r in ideal if r["ratios"]["of ideal"] >= GOAL_IDEAL_FRACTION]
            low = min(ideal, key=lambda r: r["ratios"]["of ideal"])
            lines.append(
                f"  - goal at keep {GOAL_KEEP:g} (gathered speed-up >= {GOAL_IDEAL_FRACTION:.0%} of the Amdahl ideal): "
                f"met for {len(met)}/{len(ideal)} shapes; median share {fmt_ratio(_median([r['ratios']['of ideal'] for r in ideal]))}, "
                f"lowest {fmt_ratio(low['ratios']['of ideal'])} ({_shape_txt(low)})"
            )
    lines.append("- dense is timed once per shape; the same time appears in every keep table. "
                 "At keep 1 masked and sliced are the dense model, so only gathered runs (its gather overhead). "
                 f"sliced-pad16 runs where a kept width is not a multiple of {PAD}.")
    return lines


MODEL_SPEC = _spec(
    MODEL,
    filename="models",
    title="Model forward with a task expert",
    split_by=["model", "dtype", "keep"],
    sort_by_appearance=["model", "dtype"],
    sort_descending=["keep"],
    broadcast=["keep"],
    derived={"best sliced": _best_sliced_s, "ideal": _ideal_s},
    ratios=[
        Ratio("masked x", ("dense",), ("masked",),
              note="speed-up over dense of the copy with dropped neurons zeroed (same FLOPs as dense: ~1 expected)"),
        Ratio("sliced x", ("dense",), ("sliced",), note="speed-up over dense of the sliced copy (the bar)"),
        Ratio("sliced-pad16 x", ("dense",), ("sliced-pad16",),
              note=f"speed-up over dense of the sliced copy with widths padded to a multiple of {PAD} (zero neurons)"),
        Ratio("gathered x", ("dense",), ("gathered",), note="speed-up over dense of the original model under doe.unplug_"),
        Ratio("gathered/sliced", ("gathered",), ("best sliced", "dense"),
              note="time ratio against the faster sliced copy (plain or padded), < 1: gathered beats it; "
                   "at keep 1 it is gathered/dense (the gather overhead)"),
        Ratio("of ideal", ("ideal",), ("gathered",),
              note="the gathered speed-up over dense as a share of the Amdahl ideal (ideal x)"),
        Ratio("compact x", ("dense",), ("compact",),
              note="speed-up over dense under doe.unplug_(..., compact=True) (compacted copies of the kept weights)"),
    ],
    info_columns=[
        InfoColumn("ideal x", "ideal_speedup",
                   note="Amdahl bound 1 / ((1 - f) + f * keep), f = the FFN's share of a layer's weight bytes "
                        "(< 256 tokens) or FLOPs (projections + attention scores); ignores embeddings, norms, "
                        "softmax and launch overhead"),
    ],
    checks=[
        Check("within 10% of sliced", "gathered/sliced", "<=", 1.0 / GOAL_FRACTION, when=_pruned,
              note=f"yes when gathered x >= {GOAL_FRACTION:g} * sliced x (gathered/sliced <= {1 / GOAL_FRACTION:.3f}); "
                   f"the project's goal is set at keep {GOAL_KEEP:g}"),
        Check(f">= {GOAL_IDEAL_FRACTION:.0%} of ideal", "of ideal", ">=", GOAL_IDEAL_FRACTION, when=_pruned,
              note=f"yes when the gathered speed-up is >= {GOAL_IDEAL_FRACTION:g} x the Amdahl ideal; "
                   f"the goal is set at keep {GOAL_KEEP:g}"),
    ],
    summary=_model_summary,
    plot_x="tokens",
    plot_series=["keep"],
    plot_facet="model",
    plot_panels=[
        Ratio("speed-up over dense", ("dense",), ("gathered", "sliced", "masked")),
        Ratio("time gathered / sliced (< 1 beats sliced)", ("gathered",), ("sliced",)),
    ],
    notes=[
        "Times are medians per forward call in us (median round time / calls per round).",
        "dense: the model; masked: a copy with the dropped neurons' up/gate rows and down columns zeroed; "
        "sliced: a copy with smaller FFN layers holding copies of the kept weights; gathered: the original "
        "model under doe.unplug_ (Triton gathered kernels on CUDA, the index_select reference on CPU).",
        "Random weights and random kept neurons; seq 1 rows are decode-like (one token per sequence, no KV cache).",
    ],
)


SWITCH_SPEC = _spec(
    SWITCH,
    title="Switching task experts",
    render=render_switch,
)

def _goal_keep(keys: dict) -> bool:
    return keys.get("keep") == GOAL_KEEP


def _several(field: str):
    return lambda keys: (keys.get(field) or 0) >= 2


def _mixed_comparisons(mixed: str, sequential: str, field: str, sequential_note: str, path_note: str,
                 others: tuple = ()) -> dict:
    """The ratios, path column, checks and plot panels of a mixed-batch suite: variant ``mixed``
    (and ``others``) against ``single``, ``mixed`` against ``sequential`` and ``dense``; goals at
    keep GOAL_KEEP against single and, for >= 2 ``field``, against ``sequential``."""
    return dict(
        ratios=[Ratio(f"{mixed}/single", (mixed,), ("single",),
                      note="the mixed batch vs a single-expert batch of the same size"),
                *(Ratio(f"{v}/single", (v,), ("single",)) for v in others),
                Ratio(f"{mixed}/{sequential}", (mixed,), (sequential,), note=sequential_note),
                Ratio(f"{mixed}/dense", (mixed,), ("dense",))],
        info_columns=[InfoColumn("path", "path", note=path_note)],
        checks=[Check(f"<= {GOAL_MIXED:g}x single", f"{mixed}/single", "<=", GOAL_MIXED, when=_goal_keep,
                      note=f"goal at keep {GOAL_KEEP:g}: at most {GOAL_MIXED:g}x a single-expert batch of the same size"),
                Check(f"beats {sequential}", f"{mixed}/{sequential}", "<=", 1.0, when=_several(field),
                      note=f"goal for >= 2 {field}: faster than {sequential}")],
        plot_panels=[Ratio("mixed / single-expert time", (mixed,), ("single",)),
                     Ratio(f"mixed / {sequential} time", (mixed,), (sequential,))],
    )


MIXED_KERNELS_SPEC = _spec(
    MIXED,
    title="Mixed-batch gathered GEMMs (rows of several groups in one launch)",
    split_by=["dtype", "keep", "op"],
    sort_by_appearance=["keep", "op"],
    **_mixed_comparisons("auto", "per-group", "groups", others=("segmented", "union"),
                   sequential_note="< 1: faster than one launch per group", path_note="what path='auto' chose"),
    plot_x="M",
    plot_series=["groups", "shape"],
    plot_facet="op",
    notes=[
        "Times are medians per call in us. Row m belongs to group m % groups; each group keeps its own "
        "random neurons. single: every row on group 0's list; per-group: one gathered op per group on its "
        "own rows (the one-task-at-a-time runtime); auto / segmented / union: segmented_linear / "
        "segmented_glu on that path. Triton on CUDA, the PyTorch reference on CPU (a smoke run).",
    ],
)

MIXED_SPEC = _spec(
    MIXED_MODEL,
    filename="mixed",
    title="Mixed-task batches: one forward for requests of several tasks",
    split_by=["model", "dtype", "keep"],
    sort_by_appearance=["model", "dtype"],
    broadcast=["tasks"],
    **_mixed_comparisons("mixed", "sequential", "tasks",
                   sequential_note="< 1: faster than the one-task-at-a-time runtime (a switch and a forward per task)",
                   path_note="the mixed path of the first FFN block (choose_path)"),
    plot_x="batch",
    plot_series=["tasks", "seq"],
    plot_facet="model",
    notes=[
        "Times are medians per forward in us. A batch of `batch` requests, request i of task i % tasks, "
        "each task with its own random expert. dense: the batch on the dense model; single: the batch on "
        "one expert; mixed: one forward under doe.mixed_batch; sequential: for each task, doe.unplug_ "
        "(an index swap) and a forward over its requests (the one-task-at-a-time runtime). seq 1 rows "
        "are decode-like (one token per sequence, no KV cache).",
    ],
)

def _generate_summary(table: Table) -> list:
    """Tokens/s per mode and batch (batch / time per token step), with the speed-ups."""
    lines = []
    for rec in table.records:
        if not _pruned(rec):
            continue
        t = rec["times"]
        tps = ", ".join(f"{v} {rec['batch'] / t[v]:,.1f}" for v in ("dense", "sliced", "gathered") if t.get(v))
        gx, share = rec["ratios"].get("gathered x"), rec["ratios"].get("of ideal")
        failed = rec["info"].get("capture_failed")
        lines.append(f"- {rec['model']} {rec['mode']}, batch {rec['batch']}, keep {rec['keep']:g}: tokens/s {tps}; "
                     f"gathered {fmt_ratio(gx)}x dense ({fmt_ratio(share)} of the ideal "
                     f"{fmt_ratio(rec['info'].get('ideal_speedup'))}x)"
                     + (f"; CUDA-graph capture failed ({failed}), timed eagerly" if failed else ""))
    return lines


GENERATE_SPEC = _spec(
    GENERATE,
    title="Greedy generation end to end (decode tokens/s)",
    split_by=["model", "dtype", "mode"],
    sort_by_appearance=["model", "dtype", "mode"],
    broadcast=["keep"],
    derived={"ideal": _ideal_s},
    ratios=[
        Ratio("sliced x", ("dense",), ("sliced",), note="speed-up over dense of the sliced copy (the bar)"),
        Ratio("gathered x", ("dense",), ("gathered",), note="speed-up over dense of the model under doe.unplug_"),
        Ratio("gathered/sliced", ("gathered",), ("sliced",), note="time ratio, < 1: gathered beats the sliced copy"),
        Ratio("of ideal", ("ideal",), ("gathered",), note="the gathered speed-up as a share of the ideal (ideal x)"),
    ],
    info_columns=[
        InfoColumn("ideal x", "ideal_speedup",
                   note="Amdahl bound of a decode step from bytes read: (weights + KV cache) / (the same with "
                        "the FFN weights times keep); the timed round also holds the prefill, so `of ideal` "
                        "reads a little low where the prefill is a visible share of it"),
        InfoColumn("timing", "timing", note="how the rounds ran (a failed CUDA-graph capture says why)"),
    ],
    summary=_generate_summary,
    plot_x="batch",
    plot_series=["mode"],
    plot_facet="model",
    plot_panels=[Ratio("speed-up over dense", ("dense",), ("gathered", "sliced"))],
    notes=[
        "Times are per generated token step in us: one round generates new_tokens tokens for `batch` prompts "
        "(prefill included) and is divided by new_tokens; tokens/s = batch / time.",
        "generate: Hugging Face generate() (DynamicCache); graph: a StaticCache loop with each token one CUDA-graph "
        "replay; static: the same loop run eagerly; compile: generate(cache_implementation=\"static\"), compiled "
        "by Hugging Face with torch.compile(mode=\"reduce-overhead\").",
        "dense: the model; sliced: a copy with smaller FFN layers; gathered: a copy of the model under doe.unplug_. "
        "Random weights and random kept neurons.",
    ],
)


SUITES: dict = {s.name: s for s in (KERNELS_SPEC, MODEL_SPEC, SWITCH_SPEC, MIXED_KERNELS_SPEC, MIXED_SPEC,
                                    GENERATE_SPEC)}


def spec_for(suite: str, entries: list) -> SuiteSpec:
    """The spec of a known suite, else a table of times keyed by the entries' ``group_keys``."""
    return SUITES[suite] if suite in SUITES else generic_spec(suite, entries)
