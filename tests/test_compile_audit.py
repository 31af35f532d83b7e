"""Compile audit: every kernel config built for sm_90 and sm_80 without a GPU (doe_kernels.ops.audit).

The audit runs in a subprocess without TRITON_INTERPRET (the interpreter replaces the kernels
by Python), compiles each (kernel, config, form, dtype, target) and reads the PTX and cubin.
Rows are cached by kernel source hash, so only edited kernels are rebuilt.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from doe_kernels.ops.audit import Row, failures, format_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "doe_kernels.ops.audit", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert out.exists(), f"audit did not run (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [Row.from_json(d) for d in json.loads(out.read_text())]
    print("\n" + format_table(rows))
    return rows


def test_every_config_builds_and_passes_the_audit(rows):
    bad = {f"{r.case.kernel} {r.case.form} {r.case.dtype} sm_{r.case.arch} {r.case.config}": failures(r) for r in rows}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, "\n".join(f"{k}: {'; '.join(v)}" for k, v in bad.items())


def test_matrix_covers_kernels_forms_dtypes_and_targets(rows):
    seen = {(r.case.kernel, r.case.form, r.case.dtype, r.case.arch) for r in rows}
    for kernel, form in [("linear", "rows/linear"), ("linear", "cols/neuron"), ("linear", "rows/conv1d"),
                         ("glu", "rows/linear"), ("gemv", "rows/linear"), ("gemv", "cols/neuron"),
                         ("gemv", "rows/conv1d"), ("glu-gemv", "rows/linear"), ("seg", "rows/linear"),
                         ("seg", "cols/neuron"), ("seg", "rows/conv1d"), ("seg-glu", "rows/linear")]:
        for dtype in ("bf16",) if kernel.startswith("seg") else ("bf16", "fp16"):
            for arch in (90, 80):
                assert (kernel, form, dtype, arch) in seen


def test_big_tiles_use_tensor_cores_and_pipeline_weights(rows):
    # Stated independently of failures(): the properties the audit exists for.
    big = [r for r in rows if r.case.block[0] >= 64 and not r.pruned]
    assert big
    for r in big:
        assert r.tc == ("wgmma" if r.case.arch == 90 else "mma"), r.case
        if r.case.form in ("rows/linear", "cols/neuron"):
            assert r.cp_async and r.smem > r.stage_bytes, r.case


def test_launched_configs_fit_shared_memory_without_spills(rows):
    limit = {90: 227 * 1024, 80: 163 * 1024}
    for r in rows:
        assert r.smem <= r.smem_bound, f"prune_configs underestimates shared memory: {r.case} {r.smem}"
        if r.pruned:
            continue
        assert r.smem <= limit[r.case.arch], r.case
        if r.case.form != "rows/conv1d":  # the one documented exception (audit.ALLOWED_SPILLS)
            assert r.spill == 0, r.case


def test_known_bad_glu_tiles_never_launch(rows):
    # Two 128x256 fp32 accumulators spill and their stages need 240 KB: not a GLU config any more.
    glu = {(r.case.block, r.case.num_warps, r.case.num_stages) for r in rows if r.case.kernel == "glu"}
    assert ((128, 256, 64, 8), 8, 3) not in glu and ((256, 128, 64, 8), 8, 3) not in glu


def test_decode_kernels_read_contiguous_weights_in_16_byte_vectors(rows):
    gemv = [r for r in rows if r.case.kernel in ("gemv", "glu-gemv") and r.case.form in ("rows/linear", "cols/neuron")]
    assert gemv
    for r in gemv:
        assert r.v16 and r.tc == "none", r.case


def test_every_activation_of_the_fused_kernels_builds_for_the_gpu(rows):
    # The interpreter accepts a kernel reading a plain Python global; the GPU compiler does not.
    from doe_kernels.ops._activations import ACTIVATION_IDS

    built = {(r.case.kernel, r.case.act) for r in rows if not r.error}
    for kernel in ("glu", "glu-gemv", "seg-glu"):
        for act in ACTIVATION_IDS.values():
            assert (kernel, act) in built, (kernel, act)


def test_one_config_per_kernel_when_autotuning_is_off():
    code = ("from doe_kernels.ops.gathered_gemv_kernel import gemv_configs; "
            "from doe_kernels.ops.gathered_glu_gemv_kernel import glu_gemv_configs; "
            "from doe_kernels.ops._config import autotune_configs; "
            "print(len(gemv_configs()), len(glu_gemv_configs()), "
            "*(len(autotune_configs(k)) for k in ('linear', 'glu', 'seg', 'seg-glu')))")
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DOE_KERNELS_AUTOTUNE")}
    counts = {}
    for flag in (None, "0"):
        env = dict(base, PYTHONPATH=str(ROOT), **({"DOE_KERNELS_AUTOTUNE": flag} if flag else {}))
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        counts[flag] = [int(n) for n in out.stdout.split()]
    assert counts["0"] == [1] * 6
    assert all(n > 1 for n in counts[None])
