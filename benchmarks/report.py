"""Turn pytest-benchmark JSON from the DoE suites into markdown tables and plots.

    python -m benchmarks.report BENCH.json [MORE.json ...] [--out DIR]

Writes a markdown table (and, where the suite has a plot, a png) for every suite found and
prints the tables: ``kernels.md/.png`` (benchmarks/test_kernels.py), ``models.md/.png`` (suite
``model``: forward latency, speed-ups over dense, gathered/sliced, the Amdahl ideal and the
"within 10% of sliced" goal check) and ``switch.md`` (suite ``switch``: time and bytes of
unplug / switch / restore vs building sliced layers; benchmarks/test_models.py). Nothing is parsed out of test ids: each
benchmark's ``extra_info`` carries ``suite``, its key fields, ``variant`` and ``inner`` (calls
per timed round; time per call = median round time / inner). Suites are described by a
``SuiteSpec`` (key fields, variant order, ratio / info / check columns, keys broadcast over
(a dense time shared by every keep ratio), plot, or a custom renderer); an unknown suite still gets a
table of times, keyed by its ``extra_info["group_keys"]``. Runs with only some variants (CPU)
leave the missing cells as "-".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "Ratio",
    "InfoColumn",
    "Check",
    "SuiteSpec",
    "SUITES",
    "load",
    "build_table",
    "render_markdown",
    "render_switch",
    "plot_suite",
    "main",
]

MISSING = "-"


@dataclass(frozen=True)
class Ratio:
    """A column ``num / den``; each side names variants in order of preference (the first
    one present in the row is used) or a derived pseudo-variant. ``when`` filters rows (by
    their key dict)."""

    name: str
    num: tuple
    den: tuple
    when: Optional[Callable[[dict], bool]] = None
    note: str = ""


@dataclass(frozen=True)
class InfoColumn:
    """A column read from the row's extra_info (the first benchmark of the row that has it)."""

    name: str
    field: str
    fmt: Callable[[Any], str] = lambda v: _fmt_ratio(v) if isinstance(v, (int, float)) else str(v)
    note: str = ""


@dataclass(frozen=True)
class Check:
    """A yes/no column: ratio column ``ratio`` compared with ``threshold`` (``op`` "<=" or ">=")."""

    name: str
    ratio: str
    op: str
    threshold: float
    when: Optional[Callable[[dict], bool]] = None
    note: str = ""

    def __call__(self, value: Optional[float]) -> Optional[bool]:
        if value is None or not math.isfinite(value):
            return None
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


@dataclass
class SuiteSpec:
    name: str
    title: str
    keys: list
    variants: list
    ratios: list = field(default_factory=list)
    #: pseudo-variants computed from a row's extra_info (seconds per call or None)
    derived: dict = field(default_factory=dict)
    plot_x: Optional[str] = None
    plot_series: list = field(default_factory=list)
    plot_facet: Optional[str] = None
    plot_panels: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    #: markdown: one table per combination of these key fields (in the order they appear)
    split_by: list = field(default_factory=list)
    #: row order (default: keys); numbers ascending unless listed in sort_by_appearance
    sort_keys: list = field(default_factory=list)
    sort_by_appearance: list = field(default_factory=list)
    #: numeric key fields sorted descending (e.g. keep: 1, 0.5, 0.35, 0.2)
    sort_descending: list = field(default_factory=list)
    #: key fields that a benchmark may leave None to mean "every value": its time joins each row
    #: that matches it on the other keys (e.g. the dense model, timed once for all keep ratios)
    broadcast: list = field(default_factory=list)
    info_columns: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    #: lines printed under the title (e.g. goals met), computed from the table
    summary: Optional[Callable[["Table"], list]] = None
    #: output file stem (default: the suite name)
    filename: Optional[str] = None
    #: a renderer that replaces the generic table (suite entries -> markdown)
    render: Optional[Callable[[list], str]] = None
    plot_xscale_base: int = 2


def _roofline_s(info: dict) -> Optional[float]:
    """Decode (M <= 16) lower bound: kept-weight bytes / device copy bandwidth."""
    if not _decode(info):
        return None
    bw, nbytes = info.get("copy_bw_GBps"), info.get("kept_weight_bytes")
    if not bw or not nbytes:
        return None
    return nbytes / (bw * 1e9)


def _decode(keys: dict) -> bool:
    return keys.get("M") is not None and keys["M"] <= 16


GATHERED = ("gathered-triton", "gathered-torch")

SUITES: dict = {
    "kernels": SuiteSpec(
        name="kernels",
        title="Gathered GEMM kernels",
        keys=["op", "shape", "M", "keep", "dtype"],
        variants=["dense", "sliced", "gathered-triton", "gathered-torch"],
        split_by=["dtype", "keep"],
        sort_by_appearance=["keep"],
        derived={"roofline": _roofline_s},
        ratios=[
            Ratio("triton/sliced", ("gathered-triton",), ("sliced",), note="< 1: faster than cuBLAS on a sliced copy"),
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
        plot_x="M",
        plot_series=["shape", "keep", "dtype"],
        plot_facet="op",
        plot_panels=[
            Ratio("gathered / sliced  (< 1 beats the sliced copy)", GATHERED, ("sliced",)),
            Ratio("dense / gathered  (speed-up over dense)", ("dense",), GATHERED),
        ],
        notes=[
            "Times are medians per call in us (median round time / calls per round).",
            "up: rows gather on (I, H); down: cols gather on the neuron-major (H, I) weight; "
            "glu: fused act(gate) * up. dense: F.linear on the full weights; sliced: F.linear on "
            "pre-made contiguous sliced copies (the cuBLAS bar); gathered-torch: index_select + F.linear.",
        ],
    ),
    # "model" and "switch" (benchmarks/test_models.py) are defined below, after the table code.
}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    time_s: float  # median time per call
    info: dict
    name: str


def load(paths: Sequence[str]) -> dict:
    """suite -> list of Entry, from one or more pytest-benchmark JSON files (later files win)."""
    out: dict = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            stats = b.get("stats") or {}
            median = stats.get("median")
            if median is None:
                continue
            inner = info.get("inner") or 1
            info.setdefault("suite", "misc")
            info.setdefault("variant", "time")
            if "group_keys" not in info:
                info["group_keys"] = ["group"]
                info["group"] = b.get("group") or b.get("name")
            out.setdefault(info["suite"], []).append(Entry(median / inner, info, b.get("name", "?")))
    return out


def _spec_for(suite: str, entries: list) -> SuiteSpec:
    if suite in SUITES:
        return SUITES[suite]
    keys = list(entries[0].info.get("group_keys") or ["group"])
    variants: list = []
    for e in entries:
        if e.info["variant"] not in variants:
            variants.append(e.info["variant"])
    return SuiteSpec(name=suite, title=suite, keys=keys, variants=variants)


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    spec: SuiteSpec
    variants: list  # measured variants present, in spec order
    derived: list  # derived pseudo-variants with at least one value
    ratios: list  # ratio column names with at least one value
    records: list  # dicts: key fields + "times" {variant: s} + "ratios" {name: value}, sorted
    missing_variants: list
    header: str
    info_cols: list = field(default_factory=list)  # InfoColumn with at least one value
    check_cols: list = field(default_factory=list)  # Check with at least one verdict

    def columns(self, keys: Sequence[str]) -> list:
        return (list(keys) + [f"{v} us" for v in self.variants + self.derived] + list(self.ratios)
                + [c.name for c in self.info_cols] + [c.name for c in self.check_cols])

    def row(self, rec: dict, keys: Sequence[str]) -> list:
        out = [_fmt_key(rec[k]) for k in keys]
        out += [_fmt_us(rec["times"].get(v)) for v in self.variants + self.derived]
        out += [_fmt_ratio(rec["ratios"].get(c)) for c in self.ratios]
        for c in self.info_cols:
            v = rec.get("info", {}).get(c.field)
            out.append(MISSING if v is None else c.fmt(v))
        for c in self.check_cols:
            v = rec.get("checks", {}).get(c.name)
            out.append(MISSING if v is None else ("yes" if v else "**no**"))
        return out


def _sort_key_fn(entries: list, order: list, by_appearance: set, descending: frozenset = frozenset()) -> Callable[[dict], tuple]:
    """Numbers ascending, strings (and fields in by_appearance) in order of first appearance."""
    first_seen: dict = {k: {} for k in order}
    for e in entries:
        for k in order:
            first_seen[k].setdefault(e.info.get(k), len(first_seen[k]))

    def key(rec: dict) -> tuple:
        out = []
        for k in order:
            v = rec.get(k)
            if k in by_appearance or isinstance(v, bool) or not isinstance(v, (int, float)):
                out.append((first_seen[k].get(v, 0), 0.0))
            else:
                out.append((0, -float(v) if k in descending else float(v)))
        return tuple(out)

    return key


def _fmt_us(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return MISSING
    us = s * 1e6
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def _fmt_ratio(r: Optional[float]) -> str:
    if r is None or not math.isfinite(r):
        return MISSING
    return f"{r:,.0f}" if r >= 100 else f"{r:.2f}"


def _fmt_key(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _pick(times: dict, names: tuple) -> tuple:
    for n in names:
        if times.get(n) is not None:
            return n, times[n]
    return None, None


def _distinct(entries: list, field_: str) -> str:
    vals: list = []
    for e in entries:
        v = e.info.get(field_)
        if v is not None and v not in vals:
            vals.append(v)
    return " / ".join(str(v) for v in vals)


def _header(entries: list) -> str:
    parts = []
    dev = _distinct(entries, "device_name")
    if dev:
        kind = _distinct(entries, "device")
        cap = _distinct(entries, "capability")
        parts.append(f"Device: {dev}" + (f" ({kind}" + (f", sm {cap}" if cap else "") + ")" if kind else ""))
    for label, fld in (("torch", "torch"), ("triton", "triton"), ("CUDA", "cuda"), ("sweep", "sweep"), ("timing", "timing")):
        v = _distinct(entries, fld)
        if v:
            parts.append(f"{label} {v}")
    threads = _distinct(entries, "threads")
    if threads:
        parts.append(f"CPU threads {threads}")
    bw = _distinct(entries, "copy_bw_GBps")
    if bw:
        parts.append(f"copy bandwidth {bw} GB/s (read+write)")
    rot = sorted({e.info.get("rotate_copies") for e in entries if e.info.get("rotate_copies")})
    if rot and rot != [1]:
        parts.append(f"weights rotated over {rot[0]}-{rot[-1]} copies (L2 defeated)")
    if any(e.info.get("triton_interpret") for e in entries):
        parts.append("TRITON_INTERPRET=1 (interpreter timings are not kernel speed)")
    return " · ".join(parts)


def build_table(suite: str, entries: list) -> Table:
    spec = _spec_for(suite, entries)
    keys = spec.keys
    grouped: dict = {}
    infos: dict = {}
    for e in entries:
        k = tuple(e.info.get(f) for f in keys)
        if e.info["variant"] in grouped.setdefault(k, {}):
            print(f"warning: {e.name}: duplicate of an earlier benchmark; the later one is kept", file=sys.stderr)
        grouped[k][e.info["variant"]] = e.time_s
        infos.setdefault(k, []).append(e.info)
    # Broadcast: a row with None in a broadcast field lends its times to every row that matches
    # it on the other keys; it stays a row of its own only if it matched none.
    bpos = [keys.index(f) for f in spec.broadcast if f in keys]
    wild = {k: v for k, v in grouped.items() if any(k[i] is None for i in bpos)}
    used: set = set()
    for k, times in grouped.items():
        if k in wild:
            continue
        for i in bpos:
            wk = k[:i] + (None,) + k[i + 1:]
            if wk in wild:
                used.add(wk)
                for v, t in wild[wk].items():
                    times.setdefault(v, t)
                infos[k] = infos[k] + infos[wk]
    for wk in used:
        del grouped[wk]
    present = {v for row in grouped.values() for v in row}
    variants = [v for v in spec.variants if v in present] + sorted(present - set(spec.variants))
    missing = [v for v in spec.variants if v not in present]

    records = []
    for k, times in grouped.items():
        times = dict(times)
        keyd = dict(zip(keys, k))
        info: dict = {}
        for inf in infos[k]:
            for f, v in inf.items():
                if info.get(f) is None:
                    info[f] = v
        for dname, fn in spec.derived.items():
            times[dname] = fn(info)
        rec: dict = dict(keyd)
        rec["times"] = times
        rec["info"] = info
        rec["ratios"] = {}
        for r in spec.ratios:
            if r.when is not None and not r.when(keyd):
                continue
            _, a = _pick(times, r.num)
            _, b = _pick(times, r.den)
            if a is not None and b:
                rec["ratios"][r.name] = a / b
        rec["checks"] = {}
        for c in spec.checks:
            if c.when is not None and not c.when(keyd):
                continue
            verdict = c(rec["ratios"].get(c.ratio))
            if verdict is not None:
                rec["checks"][c.name] = verdict
        records.append(rec)
    order = list(spec.split_by) + [k for k in (spec.sort_keys or keys) if k not in spec.split_by]
    order += [k for k in keys if k not in order]
    records.sort(key=_sort_key_fn(entries, order, set(spec.sort_by_appearance), frozenset(spec.sort_descending)))

    derived_cols = [d for d in spec.derived if any(rec["times"].get(d) is not None for rec in records)]
    ratio_cols = [r.name for r in spec.ratios if any(r.name in rec["ratios"] for rec in records)]
    info_cols = [c for c in spec.info_columns if any(rec["info"].get(c.field) is not None for rec in records)]
    check_cols = [c for c in spec.checks if any(c.name in rec["checks"] for rec in records)]
    return Table(spec, variants, derived_cols, ratio_cols, records, missing, _header(entries), info_cols, check_cols)


def _markdown_table(table: Table, records: list, keys: list) -> list:
    cols = table.columns(keys)
    lines = ["| " + " | ".join(cols) + " |"]
    lines.append("|" + "|".join("---" if i < len(keys) else "---:" for i in range(len(cols))) + "|")
    lines += ["| " + " | ".join(table.row(rec, keys)) + " |" for rec in records]
    return lines


def render_markdown(table: Table) -> str:
    """One table per value of ``spec.split_by`` (a heading each), or one table."""
    spec = table.spec
    lines = [f"# {spec.title}", ""]
    if table.header:
        lines += [table.header, ""]
    if spec.summary is not None:
        summary = spec.summary(table)
        if summary:
            lines += summary + [""]
    split = [k for k in spec.split_by if k in spec.keys]
    keys = [k for k in spec.keys if k not in split]
    sections: dict = {}
    for rec in table.records:
        sections.setdefault(tuple(rec[k] for k in split), []).append(rec)
    for sk, recs in sections.items():
        if split:
            lines += ["## " + ", ".join(f"{k} {_fmt_key(v)}" for k, v in zip(split, sk)), ""]
        lines += _markdown_table(table, recs, keys) + [""]
    notes = list(spec.notes)
    if table.missing_variants:
        notes.append("Not in this run: " + ", ".join(table.missing_variants) + " (skipped or not benchmarked).")
    for r in spec.ratios:
        if r.note and r.name in table.ratios:
            notes.append(f"{r.name}: {r.note}.")
    for c in table.info_cols + table.check_cols:
        if c.note:
            notes.append(f"{c.name}: {c.note}.")
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def plot_suite(table: Table, path: str) -> bool:
    """Ratio-vs-x line plots: one row of panels per facet value, one line per series (colour),
    one line style per variant pair (solid: the preferred one, e.g. gathered-triton; dashed and
    fainter: the fallback, e.g. the torch reference). Returns False if there is nothing to plot."""
    spec = table.spec
    if not spec.plot_x or not spec.plot_panels or not table.records:
        return False
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    recs = [r for r in table.records if isinstance(r.get(spec.plot_x), (int, float))]
    if not recs:
        return False
    facets: list = []
    for rec in recs:
        fv = rec.get(spec.plot_facet) if spec.plot_facet else None
        if fv not in facets:
            facets.append(fv)

    def has(name: str) -> bool:
        return any(rec["times"].get(name) is not None for rec in recs)

    panels = []
    for p in spec.plot_panels:
        combos = [(n, d) for n in p.num for d in p.den if has(n) and has(d)]
        if combos:
            panels.append((p, combos))
    if not panels:
        return False

    series_names: list = []
    for rec in recs:
        sname = tuple(rec.get(k) for k in spec.plot_series)
        if sname not in series_names:
            series_names.append(sname)
    cmap = plt.get_cmap("tab10" if len(series_names) <= 10 else "tab20")
    markers = "osD^v<>ph*"
    styles = ["-", "--", ":", "-."]

    def series_label(sname: tuple) -> str:
        return " ".join(_fmt_key(v) for v in sname) or "all"

    nrow, ncol = len(facets), len(panels)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol + 2.6, 3.2 * nrow + 0.8), squeeze=False)
    style_used: dict = {}
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for i, fv in enumerate(facets):
        for j, (p, combos) in enumerate(panels):
            ax = axes[i][j]
            ys: list = []
            for ci, (num, den) in enumerate(combos):
                for si, sname in enumerate(series_names):
                    pts = []
                    for rec in recs:
                        if spec.plot_facet and rec.get(spec.plot_facet) != fv:
                            continue
                        if tuple(rec.get(k) for k in spec.plot_series) != sname:
                            continue
                        a, b = rec["times"].get(num), rec["times"].get(den)
                        if a is not None and b:
                            pts.append((rec[spec.plot_x], a / b))
                    if not pts:
                        continue
                    pts.sort()
                    ax.plot(
                        [x for x, _ in pts],
                        [y for _, y in pts],
                        marker=markers[si % len(markers)],
                        ms=4,
                        lw=1.4 if ci == 0 else 1.0,
                        alpha=1.0 if ci == 0 else 0.55,
                        ls=styles[ci % len(styles)],
                        color=cmap(si % cmap.N),
                    )
                    ys += [y for _, y in pts]
                    # name a style by the side that varies between this panel's combos
                    varying = num if len({c[0] for c in combos}) > 1 else den
                    if len(combos) == 1:
                        varying = f"{num} / {den}"
                    labels = style_used.setdefault(ci, [])
                    if varying not in labels:
                        labels.append(varying)
            ax.axhline(1.0, color="0.35", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(fmt)
            if ys and max(ys) / max(min(ys), 1e-12) > 20:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(fmt)
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(spec.plot_x)
            facet_txt = f"{spec.plot_facet}={fv}: " if spec.plot_facet else ""
            ax.set_title(f"{facet_txt}{p.name}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if not ys:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)

    handles = [
        Line2D([], [], color=cmap(si % cmap.N), marker=markers[si % len(markers)], label=series_label(sname))
        for si, sname in enumerate(series_names)
    ]
    handles += [
        Line2D([], [], color="0.3", ls=styles[ci % len(styles)], alpha=1.0 if ci == 0 else 0.55, label=", ".join(labels))
        for ci, labels in sorted(style_used.items())
    ]
    fig.legend(handles=handles, loc="center right", fontsize=7, title=" ".join(spec.plot_series), title_fontsize=7)
    fig.suptitle(spec.title + "\n" + "\n".join(textwrap.wrap(table.header, 140)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (4.8 * ncol + 2.6), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True



# --------------------------------------------------------------------------------------------
# model-level suites (benchmarks/test_models.py)
# --------------------------------------------------------------------------------------------

#: the goal: at keep 0.35 the gathered model's speed-up over dense is within 10% of the sliced copy's
GOAL_KEEP = 0.35
GOAL_FRACTION = 0.9
#: the goal for switching experts on a 7B-shaped model
GOAL_SWITCH_S = 1e-3


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
            f"{_fmt_ratio(gx)}x, sliced {_fmt_ratio(sx)}x; worst gathered/sliced "
            f"{_fmt_ratio(worst['ratios']['gathered/sliced'])} ({_shape_txt(worst)})"
        )
    lines.append("- dense is timed once per shape; the same time appears in every keep table. "
                 "At keep 1 masked and sliced are the dense model, so only gathered runs (its gather overhead).")
    return lines


SUITES["model"] = SuiteSpec(
    name="model",
    filename="models",
    title="Model forward with a task expert",
    keys=["model", "dtype", "keep", "batch", "seq", "tokens"],
    variants=["dense", "masked", "sliced", "gathered"],
    split_by=["model", "dtype", "keep"],
    sort_by_appearance=["model", "dtype"],
    sort_descending=["keep"],
    broadcast=["keep"],
    ratios=[
        Ratio("masked x", ("dense",), ("masked",),
              note="speed-up over dense of the copy with dropped neurons zeroed (same FLOPs as dense: ~1 expected)"),
        Ratio("sliced x", ("dense",), ("sliced",), note="speed-up over dense of the sliced copy (the bar)"),
        Ratio("gathered x", ("dense",), ("gathered",), note="speed-up over dense of the original model under doe.unplug_"),
        Ratio("gathered/sliced", ("gathered",), ("sliced", "dense"),
              note="time ratio, < 1: gathered beats the sliced copy; at keep 1 it is gathered/dense (the gather overhead)"),
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


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return MISSING
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{sign}{n / scale:.3g} {unit}"
    return f"{sign}{int(n)} B"


def _fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return MISSING
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


SWITCH_OPS = ["unplug-first", "switch", "restore", "unplug", "sliced-build", "sliced-copy"]


def render_switch(entries: list) -> str:
    """Per (model, keep): one row per op with its median time and the bytes it moved."""
    lines = ["# Switching task experts: time and bytes", ""]
    header = _header(entries)
    if header:
        lines += [header, ""]
    groups: dict = {}
    for e in entries:
        groups.setdefault((e.info.get("model"), e.info.get("keep")), {})[e.info["variant"]] = e
    cuda = any(e.info.get("alloc_delta_bytes") is not None for e in entries)
    for (model, keep), ops in groups.items():
        any_info = next(iter(ops.values())).info
        lines += [f"## {model}, keep {_fmt_key(keep)}", ""]
        if any_info.get("note"):
            lines += [f"{any_info['note']}. {any_info.get('ffn_blocks')} FFN blocks; model weights "
                      f"{_fmt_bytes(any_info.get('model_weight_bytes'))}, FFN weights "
                      f"{_fmt_bytes(any_info.get('ffn_weight_bytes'))}, kept FFN weights at this keep "
                      f"{_fmt_bytes(any_info.get('kept_ffn_weight_bytes'))}, one expert's indices "
                      f"{_fmt_bytes(any_info.get('expert_index_bytes'))}.", ""]
        cols = ["op", "what", "median", "weight bytes new", "index bytes new", "resident delta"]
        if cuda:
            cols += ["CUDA alloc delta", "CUDA peak delta"]
        cols += ["weights untouched", "rounds"]
        lines += ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
        order = [o for o in SWITCH_OPS if o in ops] + sorted(set(ops) - set(SWITCH_OPS))
        for op in order:
            e = ops[op]
            i = e.info
            row = [op, i.get("op_label", ""), _fmt_time(e.time_s), _fmt_bytes(i.get("weight_bytes_new")),
                   _fmt_bytes(i.get("index_bytes_new")), _fmt_bytes(i.get("resident_bytes_delta"))]
            if cuda:
                row += [_fmt_bytes(i.get("alloc_delta_bytes")), _fmt_bytes(i.get("peak_delta_bytes"))]
            wu = i.get("weights_untouched")
            row += [MISSING if wu is None else ("yes" if wu else "no"), str(i.get("rounds", MISSING))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        sw = ops.get("switch")
        if sw is not None:
            copied = sw.info.get("weight_bytes_new")
            fast = sw.time_s < GOAL_SWITCH_S
            zero = copied == 0 and bool(sw.info.get("weights_untouched"))
            lines.append(f"- Goal (7B-shaped model on the GPU): switch < 1 ms with 0 weight bytes copied: "
                         f"{_fmt_time(sw.time_s)} ({'yes' if fast else '**no**'}), weight bytes copied "
                         f"{_fmt_bytes(copied)} ({'yes' if zero else '**no**'}).")
            for alt in ("sliced-build", "sliced-copy"):
                a = ops.get(alt)
                if a is not None and sw.time_s:
                    lines.append(f"- {alt} vs switch: {a.time_s / sw.time_s:,.0f}x the time, "
                                 f"{_fmt_bytes(a.info.get('weight_bytes_new'))} of weights copied vs "
                                 f"{_fmt_bytes(sw.info.get('weight_bytes_new'))}.")
        first = ops.get("unplug-first")
        if first is not None:
            lines.append(f"- unplug-first: the one-time re-storing of down projections moved "
                         f"{_fmt_bytes(first.info.get('weight_bytes_new'))} of weights in place"
                         + (f" (CUDA peak +{_fmt_bytes(first.info.get('peak_delta_bytes'))}, "
                            f"+{_fmt_bytes(first.info.get('alloc_delta_bytes'))} still allocated after)"
                            if first.info.get("peak_delta_bytes") is not None else "")
                         + "; on CPU nothing is converted.")
        lines.append("")
    lines += [
        "- median: one op per timed round (setup untimed, then the op and a device sync).",
        "- weight bytes new / index bytes new: storages (weights / index buffers) held after the op that were "
        "not held before (by data_ptr); resident delta: the change in bytes held by the model, the original "
        "layers kept for restore and a sliced copy; CUDA alloc/peak delta: torch.cuda.memory_stats "
        "allocated_bytes.all current after / peak during, minus current before.",
        "- weights untouched: every parameter of the model points at the same memory after the op.",
        "",
    ]
    return "\n".join(lines)


SUITES["switch"] = SuiteSpec(
    name="switch",
    title="Switching task experts",
    keys=["model", "keep"],
    variants=SWITCH_OPS,
    render=render_switch,
)

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    ap.add_argument("--out", default=None, help="output folder (default: the first JSON's folder)")
    ap.add_argument("--no-plot", action="store_true", help="tables only")
    args = ap.parse_args(argv)

    out = args.out or os.path.dirname(os.path.abspath(args.json[0]))
    os.makedirs(out, exist_ok=True)
    suites = load(args.json)
    if not suites:
        print("no benchmarks with stats in " + ", ".join(args.json), file=sys.stderr)
        return 1
    for suite, entries in suites.items():
        spec = _spec_for(suite, entries)
        stem = spec.filename or suite
        table = None
        md = spec.render(entries) if spec.render else render_markdown(table := build_table(suite, entries))
        md_path = os.path.join(out, f"{stem}.md")
        with open(md_path, "w") as f:
            f.write(md)
        print(md)
        print(f"wrote {md_path}")
        if not args.no_plot and table is not None:
            png = os.path.join(out, f"{stem}.png")
            if plot_suite(table, png):
                print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
