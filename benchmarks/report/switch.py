"""The switch suite's report: per (model, keep), the time and bytes of each op, and the goal check."""

from __future__ import annotations

from benchmarks.report.tables import MISSING, device_header, fmt_bytes, fmt_key, fmt_time
from benchmarks.suites import GOAL_SWITCH_S, SWITCH

__all__ = ["render_switch"]


def render_switch(entries: list) -> str:
    """Per (model, keep): one row per op with its median time and the bytes it moved."""
    lines = ["# Switching task experts: time and bytes", ""]
    header = device_header(entries)
    if header:
        lines += [header, ""]
    groups: dict = {}
    for e in entries:
        groups.setdefault((e.info.get("model"), e.info.get("keep")), {})[e.info["variant"]] = e
    cuda = any(e.info.get("alloc_delta_bytes") is not None for e in entries)
    for (model, keep), ops in groups.items():
        any_info = next(iter(ops.values())).info
        lines += [f"## {model}, keep {fmt_key(keep)}", ""]
        if any_info.get("note"):
            lines += [f"{any_info['note']}. {any_info.get('ffn_blocks')} FFN blocks; model weights "
                      f"{fmt_bytes(any_info.get('model_weight_bytes'))}, FFN weights "
                      f"{fmt_bytes(any_info.get('ffn_weight_bytes'))}, kept FFN weights at this keep "
                      f"{fmt_bytes(any_info.get('kept_ffn_weight_bytes'))}, one expert's indices "
                      f"{fmt_bytes(any_info.get('expert_index_bytes'))}.", ""]
        cols = ["op", "what", "median", "weight bytes new", "index bytes new", "resident delta"]
        if cuda:
            cols += ["CUDA alloc delta", "CUDA peak delta"]
        cols += ["weights untouched", "rounds"]
        lines += ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
        order = [o for o in SWITCH.variants if o in ops] + sorted(set(ops) - set(SWITCH.variants))
        for op in order:
            e = ops[op]
            i = e.info
            row = [op, i.get("op_label", ""), fmt_time(e.time_s), fmt_bytes(i.get("weight_bytes_new")),
                   fmt_bytes(i.get("index_bytes_new")), fmt_bytes(i.get("resident_bytes_delta"))]
            if cuda:
                row += [fmt_bytes(i.get("alloc_delta_bytes")), fmt_bytes(i.get("peak_delta_bytes"))]
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
                         f"{fmt_time(sw.time_s)} ({'yes' if fast else '**no**'}), weight bytes copied "
                         f"{fmt_bytes(copied)} ({'yes' if zero else '**no**'}).")
            for alt in ("sliced-build", "sliced-copy"):
                a = ops.get(alt)
                if a is not None and sw.time_s:
                    lines.append(f"- {alt} vs switch: {a.time_s / sw.time_s:,.0f}x the time, "
                                 f"{fmt_bytes(a.info.get('weight_bytes_new'))} of weights copied vs "
                                 f"{fmt_bytes(sw.info.get('weight_bytes_new'))}.")
        first = ops.get("unplug-first")
        if first is not None:
            lines.append(f"- unplug-first: the one-time re-storing of down projections moved "
                         f"{fmt_bytes(first.info.get('weight_bytes_new'))} of weights in place"
                         + (f" (CUDA peak +{fmt_bytes(first.info.get('peak_delta_bytes'))}, "
                            f"+{fmt_bytes(first.info.get('alloc_delta_bytes'))} still allocated after)"
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
