"""The load test's report: the server's Prometheus numbers, the machine, and the markdown summary."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

__all__ = ["machine", "parse_metrics", "to_markdown"]


def parse_metrics(text: str) -> dict:
    """The few numbers the report shows, from the Prometheus text."""
    def total(name, label=None):
        s = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (label is None or label in line):
                s += float(line.rsplit(" ", 1)[1])
        return s

    batches = total("doe_batch_size_count")
    errors = {}
    for m in re.finditer(r'^doe_errors_total\{kind="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
        errors[m.group(1)] = int(float(m.group(2)))
    switches = total("doe_switches_total")
    return {
        "batches": int(batches), "mean_batch_size": total("doe_batch_size_sum") / batches if batches else 0.0,
        "forward_s": total("doe_forward_seconds_sum"), "queue_wait_s_mean":
            total("doe_queue_wait_seconds_sum") / max(total("doe_queue_wait_seconds_count"), 1),
        "switches": int(switches),
        "mean_switch_ms": 1000 * total("doe_switch_seconds_sum") / switches if switches else 0.0,
        "errors": errors,
    }


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def to_markdown(report: dict) -> str:
    m, s, cfg = report["main"], report.get("shutdown"), report["config"]
    lat = m["latency_ms"]
    sm = m["server_metrics"]
    lines = [
        "# `doe serve` load test",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores"
        f"{', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}; "
        f"device {cfg['device'] or 'default'}; "
        f"torch {report['machine']['torch']}. Client and server share the machine (1-minute load average "
        f"{report['machine']['load_average_1min']:.1f} when the run ended).",
        "",
        f"Model `{cfg['model']}`, experts {', '.join(report['tasks'])}{', router' if cfg['router'] else ''}; "
        f"{cfg['clients']} concurrent clients; server --max-batch {cfg['max_batch']} --max-wait-ms "
        f"{cfg['max_wait_ms']} --max-length {cfg['max_length']} --threads {cfg['threads'] or 'default'}"
        f"{' --compact-weights' if cfg['compact_weights'] else ''}{' --mixed' if cfg['mixed'] else ''}.",
        "",
        "| requests | good (items) | bad | disconnects | throughput | items/s | p50 | p95 | p99 | lost | wrong | "
        "bad requests with another status |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {m['requests']} | {m['good_requests']} ({m['good_items']}) | {m['bad_requests']} | {m['disconnects']} | "
        f"{m['throughput_rps']:.1f} req/s | {m['items_per_s']:.1f} | {lat['p50']:.1f} ms | {lat['p95']:.1f} ms | "
        f"{lat['p99']:.1f} ms | {m['lost']} | {m['wrong']} | {m['bad_status_mismatch']} |",
        "",
        f"Server side: {sm['batches']} batches, mean batch size {sm['mean_batch_size']:.2f}, worker busy in "
        f"switch + forward {100 * sm['forward_s'] / m['wall_s']:.0f}% of the time, mean queue wait "
        f"{1000 * sm['queue_wait_s_mean']:.1f} ms, {sm['switches']} "
        f"expert switches (mean {sm['mean_switch_ms']:.3f} ms), errors by kind {sm['errors']}; 503s waited out: "
        f"{m['rejected_503']}.",
    ]
    if s:
        lines += [
            "",
            f"Shutdown under load: {s['requests']} requests on fresh connections, SIGTERM after a quarter: "
            f"{s['answered']} answered correctly, {s['wrong']} wrong, {s['unavailable_503']} got 503, "
            f"{s['refused']} refused at connect, {s['closed_unanswered']} closed unread, {s['other']} other; "
            f"server exit code {s['exit_code']}; server-side items over the whole run: {s.get('server_counts')}.",
        ]
    return "\n".join(lines) + "\n"
