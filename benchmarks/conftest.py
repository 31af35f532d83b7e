"""Fixtures for the DoE benchmark suites.

Run them only when asked (the project's ``pytest`` run collects ``tests/`` alone)::

    python -m pytest benchmarks -q --benchmark-json=bench.json
    python -m benchmarks.report bench.json --out results/

Sweep, timing mode and weight rotation are chosen by environment variables documented in
``benchmarks/harness.py`` (DOE_BENCH_SWEEP / DOE_BENCH_QUICK / DOE_BENCH_FULL, DOE_BENCH_TIMING,
DOE_BENCH_ROTATE_MB, DOE_BENCH_ROUND_MS, DOE_BENCH_ROUNDS, DOE_BENCH_THREADS).

``DOE_BENCH_BUDGET_S=N`` skips every case that would start after N seconds of the pytest run, so
a run under a hard wall-clock limit still ends normally and writes its JSON.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from benchmarks import harness
from doe_kernels.env import interpreting


def pytest_report_header(config):
    device = harness.bench_device()
    return (
        f"doe benchmarks: device={device} sweep={harness.sweep_name(device)} "
        f"timing={harness.timing_mode(device)} TRITON_INTERPRET={int(interpreting())}"
    )


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    device = harness.bench_device()
    harness.configure_cpu_threads(device)
    return device


@pytest.fixture(scope="session")
def device_info(bench_device) -> dict:
    """Device name, torch/triton versions and (CUDA) copy bandwidth, measured once per session."""
    return harness.device_info(bench_device)


_SESSION_START = time.monotonic()


@pytest.fixture(autouse=True)
def _budget_and_memory(bench_device):
    """Skip once DOE_BENCH_BUDGET_S is spent; hand each case's (rotated) weights back after it."""
    budget = os.environ.get("DOE_BENCH_BUDGET_S", "").strip()
    if budget and time.monotonic() - _SESSION_START > float(budget):
        pytest.skip(f"DOE_BENCH_BUDGET_S={budget} spent")
    yield
    if bench_device.type == "cuda":
        torch.cuda.empty_cache()
