"""The table engine: pytest-benchmark JSON -> entries -> a :class:`Table` per suite -> markdown.

A suite is described by a :class:`SuiteSpec` (key fields, variant order, ratio / info / check
columns, keys broadcast over, plot); nothing is parsed out of test ids. Time per call =
median round time / ``extra_info["inner"]``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

__all__ = ["Ratio", "InfoColumn", "Check", "SuiteSpec", "Entry", "Table", "load", "generic_spec", "build_table",
           "render_markdown"]

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
    fmt: Callable[[Any], str] = lambda v: fmt_ratio(v) if isinstance(v, (int, float)) else str(v)
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
    """How a suite becomes tables and plots: row keys, variant (column) order, extra columns."""

    name: str
    title: str
    keys: list
    variants: list
    ratios: list = field(default_factory=list)
    #: pseudo-variants: fn(row's extra_info, row's times so far) -> seconds per call or None
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


@dataclass
class Entry:
    """One benchmark: its median time per call, its extra_info and its pytest name."""

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


def generic_spec(suite: str, entries: list) -> SuiteSpec:
    """A table of times for a suite without a spec, keyed by its ``extra_info["group_keys"]``."""
    keys = list(entries[0].info.get("group_keys") or ["group"])
    variants: list = []
    for e in entries:
        if e.info["variant"] not in variants:
            variants.append(e.info["variant"])
    return SuiteSpec(name=suite, title=suite, keys=keys, variants=variants)


@dataclass
class Table:
    """A suite's rows, and which of its optional columns hold at least one value."""

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
        out = [fmt_key(rec[k]) for k in keys]
        out += [fmt_us(rec["times"].get(v)) for v in self.variants + self.derived]
        out += [fmt_ratio(rec["ratios"].get(c)) for c in self.ratios]
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


def fmt_us(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return MISSING
    us = s * 1e6
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None or not math.isfinite(r):
        return MISSING
    return f"{r:,.0f}" if r >= 100 else f"{r:.2f}"


def fmt_key(v: Any) -> str:
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


def device_header(entries: list) -> str:
    """One line: device, versions, sweep, timing, threads, bandwidth, rotation, interpreter."""
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


def build_table(spec: SuiteSpec, entries: list) -> Table:
    """Rows keyed by ``spec.keys`` (broadcast fields merged), sorted, with ratio / info / check values."""
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
            times[dname] = fn(info, times)
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
    return Table(spec, variants, derived_cols, ratio_cols, records, missing, device_header(entries), info_cols, check_cols)


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
            lines += ["## " + ", ".join(f"{k} {fmt_key(v)}" for k, v in zip(split, sk)), ""]
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


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return MISSING
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{sign}{n / scale:.3g} {unit}"
    return f"{sign}{int(n)} B"


def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return MISSING
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"
