"""Turn pytest-benchmark JSON from the DoE suites into markdown tables and plots.

    python -m benchmarks.report BENCH.json [MORE.json ...] [--out DIR]

Writes a markdown table (and, where the suite has a plot, a png) for every suite found and
prints the tables: ``kernels.md/.png`` (benchmarks/test_kernels.py), ``models.md/.png`` (suite
``model``: forward latency, speed-ups over dense, gathered/sliced, the Amdahl ideal and the
"within 10% of sliced" goal check) and ``switch.md`` (suite ``switch``: time and bytes of
unplug / switch / restore vs building sliced layers; benchmarks/test_models.py). Nothing is
parsed out of test ids: each benchmark's ``extra_info`` carries ``suite``, its key fields,
``variant`` and ``inner`` (calls per timed round; time per call = median round time / inner),
as :mod:`benchmarks.suites` defines them. An unknown suite still gets a table of times, keyed by
its ``extra_info["group_keys"]``. Runs with only some variants (CPU) leave the missing cells
as "-".

    tables.py    the engine: SuiteSpec, load, build_table, render_markdown, formatting
    plots.py     ratio-vs-x line plots of a table
    specs.py     the specs of the known suites (kernels, model, switch)
    switch.py    the switch suite's renderer
    cli.py       the command line (``__main__`` runs it)
"""

from benchmarks.report.cli import main
from benchmarks.report.plots import plot_suite
from benchmarks.report.specs import SUITES, spec_for
from benchmarks.report.switch import render_switch
from benchmarks.report.tables import Check, InfoColumn, Ratio, SuiteSpec, build_table, load, render_markdown

__all__ = [
    "Ratio",
    "InfoColumn",
    "Check",
    "SuiteSpec",
    "SUITES",
    "spec_for",
    "load",
    "build_table",
    "render_markdown",
    "render_switch",
    "plot_suite",
    "main",
]
