"""``python -m benchmarks.report BENCH.json [MORE.json ...] [--out DIR] [--no-plot]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from benchmarks.report.plots import plot_suite
from benchmarks.report.specs import spec_for
from benchmarks.report.tables import build_table, load, render_markdown

__all__ = ["main"]

DESCRIPTION = "Turn pytest-benchmark JSON from the DoE suites into markdown tables and plots."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write ``<suite>.md`` (and ``.png`` where the suite has a plot) for every suite in the JSON files."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=DESCRIPTION)
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
        spec = spec_for(suite, entries)
        stem = spec.filename or suite
        table = None
        md = spec.render(entries) if spec.render else render_markdown(table := build_table(spec, entries))
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
