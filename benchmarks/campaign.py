"""One call on a GPU machine: the test suite compiled and the benchmark suites, within a time limit.

    python3 -m benchmarks.campaign STAGE [STAGE ...] [--out DIR] [--budget SECONDS]

Stages, run in the order given:

==========  ==================================================================================
tests       ``pytest tests -x`` (on CUDA the Triton kernels run compiled, not interpreted)
generate    ``benchmarks/test_generate.py``: decode tokens/s of a LLaMA-7B-shaped causal LM
models      ``benchmarks/test_models.py``: whole-model forward sweep and the switch cost
kernels     ``benchmarks/test_kernels.py -k test_gathered_gemm``: the gathered GEMM sweep
mixed       ``benchmarks/test_mixed.py`` and the mixed-batch GEMMs (``-k test_mixed_gemm``)
==========  ==================================================================================

Each benchmark stage gets ``DOE_BENCH_BUDGET_S`` (cases that would start later are skipped, so
the stage still writes its JSON) from its default share, capped by what is left of ``--budget``
(the call's wall-clock limit, default 560 s), and a hard timeout a little past it. Then
``benchmarks.report`` turns every JSON into tables and plots. ``--out`` (default ``$OUT``) gets
two files, as few as a remote machine's file limit allows: ``summary.md`` (machine, versions,
each stage's outcome and every goal line of the reports, also printed) and ``campaign.tgz``
(the reports, plots, JSON and logs). Environment variables of the suites (``DOE_BENCH_TIMING``,
``DOE_BENCH_SWEEP``, ...) pass through.

The GPU machine's image lacks some of what the test suite needs (datasets, fastapi, ...):
``--fetch-wheels``, run where PyPI is reachable, downloads them into ``.whl/``; a call that
carries ``.whl`` gets them installed into a temporary folder before the stages run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent

#: stage -> (pytest arguments, default budget in seconds)
STAGES = {
    "tests": (["tests", "-x"], 300),
    "generate": (["benchmarks/test_generate.py"], 200),
    "models": (["benchmarks/test_models.py"], 300),
    "kernels": (["benchmarks/test_kernels.py", "-k", "test_gathered_gemm"], 150),
    "mixed": (["benchmarks/test_mixed.py", "benchmarks/test_kernels.py", "-k", "test_mixed or test_mixed_gemm"], 300),
}
GRACE_S = 60  # a case that started inside the budget may run this long past it
#: what the test suite needs that the GPU machine's image lacks (it has torch, triton,
#: transformers, pytest, pytest-benchmark, matplotlib, httpx, pyarrow, pandas, ...)
DEVICE_WHEELS = ("datasets", "dill", "multiprocess", "fastapi", "starlette", "pydantic", "pydantic_core",
                 "annotated-types", "typing-inspection", "typing-extensions", "uvicorn", "opentelemetry-api",
                 "importlib-metadata")
DEVICE_PYTHON = "3.12"
WHEELS = ROOT / ".whl"
REPORT_S = 40  # kept back for the report and the archive


def fetch_wheels(dest: Path = WHEELS) -> int:
    """Here, with PyPI reachable: download :data:`DEVICE_WHEELS` for the GPU machine's Python into
    ``dest`` (the versions installed here, where they are), to travel with the call."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in DEVICE_WHEELS:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest), *reqs]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def install_wheels(src: Path = WHEELS) -> tuple:
    """There: install the wheels of ``src`` (if any) into a temporary folder. Returns (the folder
    for PYTHONPATH or None, a line for the summary); a failed install is reported, not raised."""
    wheels = sorted(str(p) for p in src.glob("*.whl")) if src.is_dir() else []
    if not wheels:
        return None, "Carried wheels: none"
    target = tempfile.mkdtemp(prefix="doe-wheels-")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--target", target, *wheels], capture_output=True, text=True)
    if run.returncode != 0:
        return None, f"Carried wheels: install failed ({(run.stderr or run.stdout).strip()[-300:]})"
    return target, f"Carried wheels: {', '.join(Path(w).name.split('-')[0] for w in wheels)}"


def _env_lines() -> list:
    lines = []
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        lines.append(f"GPU: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.SubprocessError) as exc:
        lines.append(f"GPU: none ({type(exc).__name__})")
    code = ("import torch, triton, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), "
            "triton {triton.__version__}, transformers {transformers.__version__}')")
    v = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines.append(f"Versions: {v.stdout.strip() or v.stderr.strip()[-300:]}")
    lines.append(f"Python {sys.version.split()[0]}; DOE_BENCH_* = "
                 + (", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("DOE_BENCH_")) or "none"))
    return lines


def _outcome_line(path: Path) -> str:
    """pytest's closing line (passed / failed / skipped counts), else the log's last line."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    words = (" passed", " failed", " error", " skipped", " deselected", "no tests ran")
    closing = [ln for ln in lines if any(w in ln for w in words) and " in " in ln]
    return (closing or lines or ["(no output)"])[-1].strip("= ")


def run_stage(stage: str, raw: Path, left_s: float) -> tuple:
    """Run one stage; returns (its summary line, its JSON path or None)."""
    args, share = STAGES[stage]
    budget = max(0.0, min(share, left_s - GRACE_S - REPORT_S))
    if budget < 20:
        return f"- {stage}: not run ({left_s:.0f} s left of the call's budget)", None
    log = raw / f"{stage}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider"]
    js = None
    if stage != "tests":
        js = raw / f"{stage}.json"
        cmd.append(f"--benchmark-json={js}")
        env["DOE_BENCH_BUDGET_S"] = f"{budget:.0f}"
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=budget + GRACE_S).returncode
            outcome = f"exit {rc}"
        except subprocess.TimeoutExpired:
            outcome = f"stopped after {budget + GRACE_S:.0f} s"
    took = time.monotonic() - t0
    line = f"- {stage}: {outcome} in {took:.0f} s (budget {budget:.0f} s): {_outcome_line(log)}"
    return line, (js if js is not None and js.is_file() else None)


def _goal_lines(report: Path) -> list:
    """Per report: its summary lines (goals met, tokens/s) and its check cells counted."""
    out = []
    for md in sorted(report.glob("*.md")):
        text = md.read_text().splitlines()
        head = [ln for ln in text[:60] if ln.startswith(("- ", "  - ")) and ("goal" in ln or "tokens/s" in ln)]
        yes = sum(ln.count("| yes ") for ln in text if ln.startswith("|"))
        no = sum(ln.count("| **no** ") for ln in text if ln.startswith("|"))
        counts = f" (check cells: {yes} yes, {no} no)" if yes or no else ""
        out += [f"**{md.name}**{counts}", *head]
    return out


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="*", metavar="STAGE", help=f"what to run, in this order: {', '.join(STAGES)}")
    ap.add_argument("--fetch-wheels", action="store_true",
                    help=f"only download, into {WHEELS.name}/, the wheels the GPU machine lacks (run it here, then carry "
                         f"{WHEELS.name} with the call: the campaign installs them there)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for summary.md and campaign.tgz (default $OUT)")
    ap.add_argument("--budget", type=float, default=560.0, help="the call's wall-clock limit in seconds (default 560)")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    bad = [st for st in args.stages if st not in STAGES]
    if bad or not args.stages:
        ap.error(f"stages: expected one or more of {', '.join(STAGES)}, got {' '.join(args.stages) or 'none'}")
    if not args.out:
        ap.error("--out: no folder given and $OUT is not set")
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="doe-campaign-"))
    raw, report = work / "raw", work / "report"
    raw.mkdir()

    site, wheels_line = install_wheels()
    if site:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    summary = ["# Benchmark campaign", "", *_env_lines(), wheels_line, "",
               f"Stages: {' '.join(args.stages)}", ""]
    (raw / "env.txt").write_text("\n".join(summary) + "\n")
    jsons = []
    for stage in args.stages:
        line, js = run_stage(stage, raw, args.budget - (time.monotonic() - start))
        print(line, flush=True)
        summary.append(line)
        (out / "summary.md").write_text("\n".join(summary) + "\n")  # something comes back even if the call is killed
        if js is not None:
            jsons.append(str(js))
    if jsons:
        left = max(10.0, args.budget - (time.monotonic() - start) - 5)
        try:
            plots = importlib.util.find_spec("matplotlib") is not None
            rep = subprocess.run([sys.executable, "-m", "benchmarks.report", *jsons, "--out", str(report),
                                  *([] if plots else ["--no-plot"])], cwd=ROOT, capture_output=True, text=True,
                                 timeout=left)
            (raw / "report.log").write_text(rep.stdout + rep.stderr)
            summary += ["", f"Report: exit {rep.returncode}" + ("" if plots else " (no matplotlib: tables only)"), ""]
            summary += _goal_lines(report)
        except subprocess.TimeoutExpired:
            summary += ["", f"Report: stopped after {left:.0f} s (the JSON is in the archive)"]
    summary.append(f"\nWall time {time.monotonic() - start:.0f} s.")
    text = "\n".join(summary) + "\n"
    (out / "summary.md").write_text(text)
    shutil.copy(out / "summary.md", work / "summary.md")
    with tarfile.open(out / "campaign.tgz", "w:gz") as tar:
        for p in (work / "summary.md", raw, report):
            if p.exists():
                tar.add(p, arcname=p.name)
    shutil.rmtree(work, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
