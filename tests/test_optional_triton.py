"""Triton is optional: without it (no wheels off Linux) doe runs on the PyTorch reference.

The child process below meets ``import triton`` as a host without the package does
(``sys.modules["triton"] = None`` makes the import raise ModuleNotFoundError and
``importlib.util.find_spec`` return None); this process and the environment are untouched.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys
sys.modules["triton"] = None

import torch
import doe
import doe_kernels
from doe.testing import assert_same_as, gathered_wrappers, random_expert_indices, sliced_copy, snapshot
from doe_kernels.dispatch import triton_available
from tiny_models import make_tiny, model_logits, sample_inputs

out = {"triton_available": triton_available(), "families": {}}
for family in ("llama", "gpt2"):  # the fused GLU path and the two-linear path
    model = make_tiny(family)
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    snap = snapshot(model)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35), task="toy")
    reference = model_logits(sliced_copy(model, expert.indices), inputs)
    row = {}
    for backend in ("auto", "torch"):
        doe.unplug_(model, expert, backend=backend)
        got = model_logits(model, inputs)
        row[backend] = {"wrappers": len(gathered_wrappers(model)),
                        "err": (got - reference).abs().max().item(),
                        "changed": (got - dense).abs().max().item()}
        doe.restore_(model)
    row["restored"] = torch.equal(model_logits(model, inputs), dense)
    assert_same_as(model, snap)
    try:
        doe.unplug_(model, expert, backend="triton")
        row["unplug_triton"] = None
    except RuntimeError as exc:
        row["unplug_triton"] = str(exc)
    row["unplugged_after_refusal"] = doe.is_unplugged(model)
    out["families"][family] = row
try:
    doe_kernels.gathered_linear(torch.randn(2, 8), torch.randn(6, 8), rows=torch.tensor([1, 4]), backend="triton")
    out["op_triton"] = None
except RuntimeError as exc:
    out["op_triton"] = str(exc)
print(json.dumps(out))
"""


def test_doe_runs_on_the_reference_without_triton_and_refuses_backend_triton():
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHILD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["triton_available"] is False  # the child really ran without triton
    for family, row in out["families"].items():
        for backend in ("auto", "torch"):
            assert row[backend]["wrappers"] > 0, (family, backend)
            assert row[backend]["err"] < 1e-4, (family, backend, row[backend]["err"])
            assert row[backend]["changed"] > 1e-3, (family, backend)  # the expert changed the outputs
        assert row["restored"], family
        assert row["unplug_triton"] is not None, f"{family}: unplug_(backend='triton') ran without triton"
        assert not row["unplugged_after_refusal"], family
    for message in [row["unplug_triton"] for row in out["families"].values()] + [out["op_triton"]]:
        assert message is not None
        assert "backend='triton' needs the triton package" in message, message
        assert "No module named 'triton'" in message or "import of triton halted" in message, message
        assert "backend='torch'" in message, message


def test_triton_is_required_only_where_it_has_wheels():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (triton,) = [Requirement(d) for d in deps if Requirement(d).name == "triton"]
    assert triton.marker is not None, "triton must carry an environment marker"
    assert triton.marker.evaluate({"platform_system": "Linux"})
    for system in ("Darwin", "Windows"):
        assert not triton.marker.evaluate({"platform_system": system}), system
