"""Timing machinery shared by the DoE benchmark suites (kernels and whole models).

Why it looks like this:

- A decode-size kernel takes ~10-30 us on an H100, about as long as a ``cudaSynchronize``.
  So one benchmark *round* runs the op ``inner`` times back to back and synchronizes once;
  ``inner`` is calibrated per case so a round lasts >= ``DOE_BENCH_ROUND_MS`` (2 ms on GPU,
  1 ms on CPU). pytest-benchmark's stats are therefore *per round*: divide by
  ``extra_info["inner"]`` for the time per call (``benchmarks.report`` does).
- The first call of each shape compiles / autotunes Triton kernels. It happens once during
  calibration, then ``warmup_rounds`` more rounds run untimed.
- Weights rotate through ``rotate_copies`` identical copies whose combined read footprint is a
  few times the GPU's L2 cache, so a back-to-back loop cannot serve a small (BERT-sized) weight
  from L2 and beat the HBM roofline that a real multi-layer model would hit.
  ``DOE_BENCH_ROTATE_MB=0`` turns that off.
- ``DOE_BENCH_TIMING=graph`` captures the ``inner`` calls in one CUDA graph and times its
  replay: that removes Python / launch overhead and shows pure GPU time. The default, ``eager``,
  times what an eager PyTorch program pays. A failed capture falls back to eager and says so in
  ``extra_info["timing"]``.

Environment variables (all optional):

==================  ==========================================================================
DOE_BENCH_SWEEP     ``tiny`` | ``quick`` | ``campaign`` | ``full``; default ``full`` on CUDA,
                    ``tiny`` on CPU. ``campaign``: the shapes that matter, sized so that
                    ``python3 -m benchmarks.campaign`` runs every suite in one GPU call.
DOE_BENCH_QUICK=1   same as DOE_BENCH_SWEEP=quick;  DOE_BENCH_FULL=1: same as ...=full.
DOE_BENCH_TIMING    ``eager`` (default) | ``graph`` (CUDA graphs; CUDA only).
DOE_BENCH_ROTATE_MB read footprint the weight copies must cover; default 4 x L2 (min 128 MB)
                    on CUDA, 0 (no copies) on CPU.
DOE_BENCH_ROUND_MS  minimum duration of one timed round (default 2 on CUDA, 1 on CPU).
DOE_BENCH_ROUNDS    timed rounds per case (default 25 on CUDA, 10 on CPU).
DOE_BENCH_DEVICE    force ``cpu`` or ``cuda`` (default: cuda if available).
DOE_BENCH_THREADS   CPU runs: torch intra-op threads (default 1: on a shared CPU host, idle
                    OpenMP workers waking up between rounds cost whole scheduler slices).
==================  ==========================================================================
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from typing import Any, Callable, Optional, Sequence

import torch

from doe_kernels.env import env_flag, interpreting, synchronize

__all__ = [
    "bench_device",
    "sweep_name",
    "timing_mode",
    "configure_cpu_threads",
    "device_info",
    "measure_copy_bandwidth",
    "rotation_copies",
    "run_timed",
]

#: the sweep names every suite knows (each suite's own SWEEPS maps them to its cases)
SWEEPS = ("tiny", "quick", "campaign", "full")
_MAX_INNER = 4096
_ROTATE_MAX_COPIES = 256
_ROTATE_MAX_ALLOC = 4 << 30  # never allocate more than 4 GiB of weight copies for one case


def bench_device() -> torch.device:
    forced = os.environ.get("DOE_BENCH_DEVICE", "").strip().lower()
    if forced:
        if forced.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("DOE_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sweep_name(device: Optional[torch.device] = None) -> str:
    device = device or bench_device()
    name = os.environ.get("DOE_BENCH_SWEEP", "").strip().lower()
    if not name:
        if env_flag("DOE_BENCH_FULL"):
            name = "full"
        elif env_flag("DOE_BENCH_QUICK"):
            name = "quick"
        else:
            name = "full" if device.type == "cuda" else "tiny"
    if name not in SWEEPS:
        raise ValueError(f"DOE_BENCH_SWEEP: expected one of {', '.join(SWEEPS)}, got {name!r}")
    return name


def timing_mode(device: torch.device) -> str:
    mode = os.environ.get("DOE_BENCH_TIMING", "eager").strip().lower() or "eager"
    if mode not in {"eager", "graph"}:
        raise ValueError(f"DOE_BENCH_TIMING: expected eager or graph, got {mode!r}")
    return mode if device.type == "cuda" else "eager"


def measure_copy_bandwidth(device: torch.device, nbytes: int = 512 << 20, iters: int = 20) -> Optional[float]:
    """Device copy bandwidth in bytes/s, counting read + write (``2 * nbytes`` per copy).

    Times a large ``dst.copy_(src)`` with CUDA events (median of ``iters``). Returns None on
    CPU: a CPU number would not be a roofline for anything this project claims.
    """
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing/broken package is just "unknown" here
        return None


@functools.lru_cache(maxsize=None)
def _device_info(device_str: str) -> dict:
    device = torch.device(device_str)
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "sweep": sweep_name(device),
        "timing": timing_mode(device),
        "triton_interpret": interpreting(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
        info["l2_bytes"] = int(getattr(props, "L2_cache_size", 0) or 0) or None
        bw = measure_copy_bandwidth(device)
        info["copy_bw_GBps"] = round(bw / 1e9, 1) if bw else None
    else:
        info["device_name"] = _cpu_name()
        info["threads"] = torch.get_num_threads()
        info["copy_bw_GBps"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def configure_cpu_threads(device: torch.device) -> None:
    """CPU runs use DOE_BENCH_THREADS intra-op threads (default 1); call before any timing."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("DOE_BENCH_THREADS", "1"))))


def device_info(device: torch.device) -> dict:
    """Device name, versions, sweep, timing mode and (CUDA) copy bandwidth; measured once per process."""
    return dict(_device_info(str(device)))


def _rotate_target_bytes(device: torch.device) -> int:
    env = os.environ.get("DOE_BENCH_ROTATE_MB", "").strip()
    if env:
        return int(float(env) * (1 << 20))
    if device.type != "cuda":
        return 0
    l2 = _device_info(str(device)).get("l2_bytes") or (50 << 20)
    return max(4 * l2, 128 << 20)


def rotation_copies(device: torch.device, read_bytes: int, alloc_bytes: int) -> int:
    """How many copies of a case's weights to rotate through.

    read_bytes: bytes one call reads from the weights (what must not stay L2-resident);
    alloc_bytes: bytes one copy allocates (a gathered op allocates the full weight but reads
    only the kept part).
    """
    target = _rotate_target_bytes(device)
    if target <= 0 or read_bytes <= 0:
        return 1
    n = math.ceil(target / read_bytes)
    n = min(n, _ROTATE_MAX_COPIES, max(1, _ROTATE_MAX_ALLOC // max(alloc_bytes, 1)))
    return max(1, n)


def _calibrate(body_one: Callable[[int], None], sync: Callable[[], None], round_s: float) -> int:
    """Smallest ``inner`` (within [1, _MAX_INNER]) such that ``inner`` calls take >= round_s.

    The per-call estimate is the best of three timings, so one scheduler hiccup (shared CPU
    hosts) cannot shrink ``inner`` to 1 and leave the sync overhead in every round.
    """

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        body_one(n)
        sync()
        return time.perf_counter() - t0

    n = 1
    while True:
        dt = min(timed(n) for _ in range(3)) if n <= 64 else timed(n)
        if dt >= round_s / 2 or n >= _MAX_INNER:
            break
        n = min(_MAX_INNER, max(2 * n, math.ceil(n * (round_s / 2) / max(dt, 1e-7))))
    dt = min(dt, timed(n), timed(n))
    per_call = dt / n
    return int(min(_MAX_INNER, max(1, math.ceil(round_s / per_call))))


def run_timed(
    benchmark,
    calls: Sequence[Callable[[], Any]],
    device: torch.device,
    *,
    round_ms: Optional[float] = None,
    rounds: Optional[int] = None,
    warmup_rounds: Optional[int] = None,
    slow: bool = False,
) -> dict:
    """Time ``calls`` (one per rotated weight copy) with ``benchmark.pedantic``.

    One round runs ``inner`` calls, ``calls[i % len(calls)]``, then synchronizes once; the
    per-call time is ``round time / inner``. Everything runs under ``torch.inference_mode()``.

    Args:
        benchmark: pytest-benchmark's fixture.
        calls: zero-argument callables, one per rotated weight copy.
        device: where they run (what to synchronize).
        round_ms, rounds, warmup_rounds: default to DOE_BENCH_ROUND_MS / DOE_BENCH_ROUNDS and
            the device's defaults.
        slow: the Triton interpreter: one call per round and two rounds.

    Returns:
        The timing facts (inner, rounds, warmup_rounds, timing, rotate_copies), also merged into
        ``benchmark.extra_info``.
    """
    if not calls:
        raise ValueError("run_timed: no calls")
    sync = functools.partial(synchronize, device)
    cuda = device.type == "cuda"
    if round_ms is None:
        round_ms = float(os.environ.get("DOE_BENCH_ROUND_MS", 2.0 if cuda else 1.0))
    if rounds is None:
        rounds = int(os.environ.get("DOE_BENCH_ROUNDS", 25 if cuda else 10))
    if warmup_rounds is None:
        warmup_rounds = 5 if cuda else 2
    ncopies = len(calls)

    def run_n(n: int) -> None:
        with torch.inference_mode():
            for i in range(n):
                calls[i % ncopies]()

    # First calls: Triton compile + autotune, cuBLAS heuristics, allocator warm-up.
    run_n(min(ncopies, 2))
    sync()
    if slow:
        inner, rounds, warmup_rounds = 1, min(rounds, 2), 0
    else:
        inner = _calibrate(run_n, sync, round_ms * 1e-3)
    seq = [calls[i % ncopies] for i in range(inner)]

    def body() -> None:
        for f in seq:
            f()

    timing = timing_mode(device)
    graph = None
    if timing == "graph":
        try:
            graph = _capture(body, device)
        except Exception as exc:  # noqa: BLE001 - fall back, but say so in the results
            timing = f"eager (graph capture failed: {type(exc).__name__}: {exc})"[:200]
            graph = None

    if graph is not None:
        def one_round() -> None:
            graph.replay()
            sync()
    else:
        def one_round() -> None:
            with torch.inference_mode():
                body()
            sync()

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    facts = {
        "inner": inner,
        "rounds": rounds,
        "warmup_rounds": warmup_rounds,
        "timing": timing,
        "rotate_copies": ncopies,
    }
    benchmark.extra_info.update(facts)
    del graph
    return facts


def _capture(body: Callable[[], None], device: torch.device):
    """Capture ``body`` in a CUDA graph (after warm-up on a side stream, as PyTorch requires)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode():
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
    torch.cuda.synchronize(device)
    graph.replay()
    torch.cuda.synchronize(device)
    return graph
