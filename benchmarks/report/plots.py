"""Ratio-vs-x line plots of a suite's table (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from benchmarks.report.tables import Table, fmt_key

__all__ = ["plot_suite"]


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
        return " ".join(fmt_key(v) for v in sname) or "all"

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
