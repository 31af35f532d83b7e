"""The benchmark machinery on CPU: the decoding loops of the generate suite against a greedy loop
by hand, and the suites plus their report end to end (a smoke run, so that a GPU session spends
its time measuring, not debugging)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import doe
from benchmarks.decode import StaticDecoder, hf_generate
from doe.testing import random_expert_indices
from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parent.parent


def _greedy_by_hand(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """No cache: the whole sequence through the model for every token."""
    seq = ids
    with torch.inference_mode():
        for _ in range(new):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("unplugged", [False, True])
def test_static_decoder_and_generate_match_a_greedy_loop_by_hand(family, unplugged):
    model = make_tiny(family)
    if unplugged:
        doe.unplug_(model, doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35), task="t"))
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    want = _greedy_by_hand(model, ids, 6)
    decoder = StaticDecoder(model, batch=3, prompt=9, new_tokens=6)
    decoder.prepare(ids)
    first = decoder.run(ids).clone()
    assert torch.equal(first, want)
    assert torch.equal(decoder.run(ids), want)  # a second run starts from a clean cache
    with torch.inference_mode():
        assert torch.equal(hf_generate(model, ids, 6), want)


def test_static_decoder_refuses_bad_input():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="graph=True needs a CUDA model, got one on cpu"):
        StaticDecoder(model, 1, 4, 4, graph=True)
    with pytest.raises(ValueError, match="new_tokens: expected >= 1, got 0"):
        StaticDecoder(model, 1, 4, 0)
    decoder = StaticDecoder(model, 2, 4, 3)
    with pytest.raises(ValueError, match=r"ids: expected shape \(2, 4\), got \(2, 5\)"):
        decoder.prepare(torch.ones(2, 5, dtype=torch.long))


def test_suites_and_report_smoke_run(tmp_path):
    """The generate suite and one kernel case (the Triton interpreter included), then the report:
    every table has its rows, ratios and goal lines."""
    env = dict(os.environ, TRITON_INTERPRET="1", DOE_BENCH_DEVICE="cpu", DOE_BENCH_GEN_BATCHES="2",
               DOE_BENCH_GEN_PROMPT="8", DOE_BENCH_GEN_NEW="4", DOE_BENCH_GEN_ROUNDS="2", DOE_BENCH_ROUNDS="2",
               PYTHONPATH=str(ROOT))
    js = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_generate.py",
           "benchmarks/test_kernels.py", "-k", "test_generate or up-tiny-M1-", f"--benchmark-json={js}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    variants = {(b["extra_info"]["suite"], b["extra_info"]["variant"]) for b in json.loads(js.read_text())["benchmarks"]}
    assert {("generate", v) for v in ("dense", "sliced", "gathered")} <= variants
    assert {("kernels", v) for v in ("dense", "sliced", "sliced-pad16", "gathered-triton")} <= variants

    out = tmp_path / "report"
    plots = importlib.util.find_spec("matplotlib") is not None  # the [bench] extra, not [test]
    rep = subprocess.run([sys.executable, "-m", "benchmarks.report", str(js), "--out", str(out),
                          *([] if plots else ["--no-plot"])], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    gen = (out / "generate.md").read_text()
    for mode in ("static", "generate"):
        assert f"llama-small {mode}, batch 2, keep 0.35: tokens/s dense " in gen
        assert f"## model llama-small, dtype fp32, mode {mode}" in gen
    assert "| of ideal |" in gen
    assert (out / "generate.png").is_file() == plots
    kern = (out / "kernels.md").read_text()
    assert "best sliced us" in kern and "triton/sliced" in kern
    assert "- goal: gathered-triton within 1.05x of cuBLAS on the best sliced copy: met for " in kern
    assert "- goal: decode (M <= 16) within 1.15x" not in kern  # no copy bandwidth on CPU: no roofline verdicts


def test_campaign_runs_stages_within_its_budget_and_packs_two_files(tmp_path):
    import tarfile

    env = dict(os.environ, DOE_BENCH_DEVICE="cpu", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the kernel stage then skips the Triton cases: seconds, not minutes
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.campaign", "generate", "kernels", "--out", str(out), "--budget", "160"]
    run = subprocess.run(cmd, cwd=ROOT, env={**env, "DOE_BENCH_GEN_NEW": "2", "DOE_BENCH_GEN_BATCHES": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["campaign.tgz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "- kernels: exit 0 in " in summary and " passed" in summary
    # 160 s leave 60 s after the grace and report reserves: generate's share (200 s) is cut to that
    m = re.search(r"- generate: exit 0 in \d+ s \(budget (\d+) s\)", summary)
    assert m and 55 <= int(m.group(1)) <= 60, summary
    assert "**generate.md**" in summary and "tokens/s dense" in summary
    with tarfile.open(out / "campaign.tgz") as tar:
        names = set(tar.getnames())
    assert {"summary.md", "raw/kernels.json", "raw/generate.json", "raw/env.txt", "report/generate.md",
            "report/kernels.md"} <= names

    bad = subprocess.run([sys.executable, "-m", "benchmarks.campaign", "tests", "bogus", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected one or more of tests, generate" in bad.stderr and "got tests bogus" in bad.stderr
