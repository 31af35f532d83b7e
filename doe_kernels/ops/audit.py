"""Compile audit: build every kernel config for a GPU target without a GPU and read the result.

    python -m doe_kernels.ops.audit [--arch 90 80] [--dtype bf16 fp16] [--jobs 2] [--json PATH]

For each kernel, autotune config, gather form / weight layout, dtype and target it compiles
the kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, with
the arguments specialised as the JIT specialises them at launch (unit strides become
constexpr 1, pointers and integers divisible by 16 get ``tt.divisibility``: the binder of
Triton's own JIT does it), then reads the PTX and the cubin (``cuobjdump -res-usage``):

    smem    shared memory per block (bytes), against the target's limit
    regs    registers per thread; spill: the stack frame in bytes (these kernels call no
            functions, so a non-zero frame is register spill)
    tc      tensor-core instruction in the PTX: wgmma (sm_90), mma (sm_80), or none
    pipe    weight loads pipelined: cp.async in the PTX and shared memory for >1 stage
    v16     16-byte vector loads (ld.global[...].v4); in the decode kernels, of the weights

``failures(row)`` states what each row must satisfy. It needs no GPU, runs where Triton's
GPU compiler is importable (the interpreter setting is removed for the run), and keeps each
row in a cache keyed by the kernel source hash, the case and the Triton version.

Forms (M rows of x; N = output features; K = reduction; the production layouts):

    rows/linear     up / gate / fc1 on an nn.Linear (N, K) row-major weight; also the input
                    gradient of cols/neuron-major, and GPT-2's c_fc once stored neuron-major
    cols/neuron     down / fc2: h @ W[:, idx]^T on a neuron-major weight (a transposed view of
                    a contiguous (inter, hidden) buffer); also GPT-2's c_proj as stored, and the
                    input gradient of rows/linear
    rows/conv1d     GPT-2's c_fc as stored, weight (in, out) read as its (out, in) view: each
                    kept neuron is a strided column (unplug stores it neuron-major on CUDA;
                    audited for the layout="original" choice, pipelining not required)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from doe_kernels.ops.audit_cases import (ARCHS, DTYPES, GEMV_KERNELS, SEGMENTED_KERNELS, Case, cases, kernel_table,
                                         launch_args)

__all__ = ["AuditUnavailable", "Row", "run", "failures", "format_table", "unavailable_reason"]

#: Forms whose weight loads must be pipelined (cp.async, more than one stage in shared memory).
PIPELINED_FORMS = ("rows/linear", "cols/neuron")
#: Forms whose weights are contiguous per neuron: decode kernels must read them 16 bytes at a time.
VECTOR_FORMS = ("rows/linear", "cols/neuron")
#: Spills accepted, and why: form -> (largest stack frame in bytes, reason).
ALLOWED_SPILLS = {
    "rows/conv1d": (32, "GPT-2's c_fc as stored reads each neuron as a strided column: a few address "
                        "registers spill outside the dot; unplug stores this weight neuron-major on CUDA, "
                        "so the form runs only when layout='original' is asked for"),
}

_CACHE_VERSION = 5


class AuditUnavailable(RuntimeError):
    """This Triton build cannot compile for a GPU target here (API or tools missing)."""


@dataclasses.dataclass
class Row:
    case: Case
    smem: int = 0
    regs: int = 0
    spill: int = 0
    tc: str = ""
    cp_async: bool = False
    stage_bytes: int = 0
    v16: bool = False
    w_async: bool = False  # the weight tiles are copied to shared memory asynchronously (TTGIR)
    smem_bound: int = 0  # the launcher's estimate, which must not be below smem
    pruned: str = ""  # why the launcher's prune drops it on this target before launch ("smem", "arch")
    error: str = ""

    @property
    def pipelined(self) -> bool:
        return self.cp_async and self.w_async and self.smem > self.stage_bytes

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["case"] = dataclasses.asdict(self.case)
        return d

    @staticmethod
    def from_json(d: dict) -> "Row":
        c = dict(d.pop("case"))
        c["block"] = tuple(c["block"])
        return Row(case=Case(**c), **d)


# ------------------------------------------------------------------------------------------
# compiling one case
# ------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise AuditUnavailable(f"{name} not found in the Triton wheel ({path})")
    return str(path)


def unavailable_reason() -> Optional[str]:
    """None when this Triton can compile for a GPU target here, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        if not hasattr(JITFunction, "_pack_args"):
            return f"triton {triton.__version__}: JITFunction._pack_args is missing (specialisation API changed)"
        _tool("ptxas")
        _tool("cuobjdump")
    except (ImportError, AuditUnavailable) as exc:
        return f"cannot compile for a GPU target with this Triton: {exc}"
    try:  # the JIT's binder and ASTSource as this module calls them (internal APIs that move)
        case = cases(archs=(90,), dtypes=("bf16",), kernels=("linear",))[0]
        fn = kernel_table()["linear"][0].fn
        backend = make_backend(GPUTarget("cuda", 90, 32))
        signature, constexprs, attrs, _ = _specialise(fn, backend, launch_args(case), {"num_warps": 4, "num_stages": 2})
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    except Exception as exc:
        return f"triton {triton.__version__}: its JIT specialisation API differs ({type(exc).__name__}: {exc})"
    return None


def _specialise(fn, backend, args: dict, options: dict):
    """(signature, constexprs, attrs, options) exactly as the JIT computes them at launch."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(**args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization, opts)
    return signature, constexprs, attrs, opts


def _config_key(c) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def config_of(case: Case):
    """The kernel's own config object for a case."""
    kernel = kernel_table()[case.kernel][0]
    for c in kernel.configs:
        kw = c.kwargs
        if (kw.get("BLOCK_N"), kw.get("BLOCK_K"), c.num_warps, c.num_stages) == (
                case.block[1], case.block[2], case.num_warps, case.num_stages) and (
                case.kernel in GEMV_KERNELS or (kw["BLOCK_M"], kw["GROUP_M"]) == (case.block[0], case.block[3])):
            return c
    raise KeyError(case)


def _compile(case: Case) -> Row:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    fn = kernel_table()[case.kernel][0].fn
    target = GPUTarget("cuda", case.arch, 32)
    return _build(Row(case), fn, target, make_backend(target))


def _annotate(row: Row) -> Row:
    """What the launcher does with the row's config on its target (not cached: the config
    lists and prune rules change without the kernel source changing)."""
    import triton

    from doe_kernels.ops._config import SMEM_LIMIT, fits_strided, select_configs, smem_bytes

    case = row.case
    kernel, weights, _ = kernel_table()[case.kernel]
    elem = 2
    limit = SMEM_LIMIT[case.arch // 10]
    row.pruned = ""
    if case.kernel in GEMV_KERNELS:  # no tiles staged in shared memory: only reductions use it
        row.stage_bytes, row.smem_bound = 0, limit
        prune = kernel.early_config_prune
        if prune is not None:
            args = launch_args(case)
            kept = prune(kernel.configs, args, **args)
            if _config_key(config_of(case)) not in {_config_key(c) for c in kept}:
                row.pruned = "form"
        return row
    config = triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), case.block)),
                           num_warps=case.num_warps, num_stages=case.num_stages)
    one_stage = triton.Config(config.kwargs, num_warps=case.num_warps, num_stages=1)
    assumed = getattr(kernel.early_config_prune, "weights", 1)  # what the launcher's prune assumes
    row.stage_bytes = smem_bytes(one_stage, elem, weights)
    row.smem_bound = smem_bytes(config, elem, assumed, case.arch)
    launched = select_configs(kernel.configs, launch_args(case)["M_BUCKET"], elem, assumed, case.arch, limit)
    if _config_key(config) not in {_config_key(c) for c in launched}:
        row.pruned = "arch" if getattr(config_of(case), "min_arch", 0) > case.arch else "smem"
    elif case.kernel in SEGMENTED_KERNELS:
        args = launch_args(case)
        if not fits_strided(config, args.get("ROWS", True), args["stride_wk"]):
            row.pruned = "form"
    return row


def _build(row: Row, fn, target, backend) -> Row:
    import triton
    from triton.compiler import ASTSource

    case = row.case
    try:
        signature, constexprs, attrs, opts = _specialise(
            fn, backend, launch_args(case), {"num_warps": case.num_warps, "num_stages": case.num_stages})
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=opts.__dict__)
    except Exception as exc:  # a failed build is a result, reported in the table
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        return row
    ptx = compiled.asm["ptx"]
    row.smem = int(compiled.metadata.shared)
    row.tc = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync\.", ptx) else "none"
    row.cp_async = "cp.async" in ptx
    bk, bn = case.block[2], case.block[1]
    row.w_async = re.search(rf"async_copy_global_to_local .*-> <{bk}x{bn}x", compiled.asm["ttgir"]) is not None
    # 16-byte loads; in the decode kernels only the weights are loaded with evict_first
    pattern = r"\bld\.global\.L1::evict_first[\w.:]*\.v4\." if case.kernel in GEMV_KERNELS else r"\bld\.global[\w.:]*\.v4\."
    row.v16 = re.search(pattern, ptx) is not None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    row.regs = int(regs.group(1)) if regs else -1
    row.spill = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    return row


# ------------------------------------------------------------------------------------------
# the matrix, the cache, the checks
# ------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("DOE_AUDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "doe_kernels", "audit")
    return Path(root)


def _cache_key(case: Case) -> str:
    import triton

    kernel = kernel_table()[case.kernel][0]
    text = json.dumps([_CACHE_VERSION, triton.__version__, kernel.fn.cache_key, dataclasses.asdict(case)],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cached_compile(case: Case) -> Row:
    path = _cache_dir() / f"{_cache_key(case)}.json"
    if path.exists():
        try:
            return _annotate(Row.from_json(json.loads(path.read_text())))
        except (ValueError, TypeError, KeyError):
            pass
    row = _compile(case)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(row.to_json()))
        tmp.replace(path)
    except OSError:
        pass
    return _annotate(row)


def run(case_list, jobs: int = 2) -> list:
    """Compile every case (cached); rows in the order of ``case_list``."""
    reason = unavailable_reason()
    if reason:
        raise AuditUnavailable(reason)
    if jobs <= 1 or len(case_list) <= 1:
        return [_cached_compile(c) for c in case_list]
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(_cached_compile, case_list, chunksize=1))


def failures(row: Row) -> list:
    """What is wrong with a row (empty when it passes)."""
    c = row.case
    if row.error:
        return [f"does not compile: {row.error}"]
    out = []
    from doe_kernels.ops._config import SMEM_LIMIT

    limit = SMEM_LIMIT[c.arch // 10]
    if row.smem > limit and row.pruned != "smem":
        out.append(f"needs {row.smem} B of shared memory (sm_{c.arch} has {limit}) and prune_configs keeps it")
    if row.smem > row.smem_bound:
        out.append(f"needs {row.smem} B of shared memory, more than the {row.smem_bound} B prune_configs assumes")
    if row.pruned:
        return out  # never launched on this target: the rest does not matter
    if c.kernel in GEMV_KERNELS and c.form in VECTOR_FORMS and not row.v16:
        out.append("weights not read as 16-byte vectors (no ld.global.v4 in the PTX)")
    if c.block[0] >= 64:
        want = "wgmma" if c.arch >= 90 else "mma"
        if row.tc != want:
            out.append(f"BLOCK_M {c.block[0]} uses {row.tc or 'no'} tensor-core op, expected {want}")
    if c.form in PIPELINED_FORMS and c.kernel in ("linear", "glu", *SEGMENTED_KERNELS) and c.num_stages > 1 \
            and not row.pipelined:
        out.append(f"weight loads not pipelined (cp.async {row.cp_async}, smem {row.smem} B, one stage {row.stage_bytes} B)")
    if row.spill and row.spill > ALLOWED_SPILLS.get(c.form, (0, ""))[0]:
        out.append(f"spills: {row.spill} B stack frame at {row.regs} registers")
    return out


def format_table(rows) -> str:
    head = f"{'kernel':6} {'form':12} {'dtype':5} {'sm':3} {'config':22} {'smem':>7} {'regs':>4} {'spill':>5} " \
           f"{'tc':5} {'pipe':4} {'v16':3}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.case
        bad = failures(r)
        verdict = "ok" if not bad else "FAIL: " + "; ".join(bad)
        if r.pruned and not bad:
            verdict = f"pruned ({r.pruned})"
        elif r.spill and not bad:
            verdict = "ok (spill allowed)"
        if r.error:
            lines.append(f"{c.kernel:6} {c.form:12} {c.dtype:5} {c.arch:<3} {c.config:22} {'-':>7} {'-':>4} {'-':>5} "
                         f"{'-':5} {'-':4} {'-':3}  {verdict}")
            continue
        lines.append(
            f"{c.kernel:6} {c.form:12} {c.dtype:5} {c.arch:<3} {c.config:22} {r.smem // 1024:>6}K {r.regs:>4} "
            f"{r.spill:>5} {r.tc:5} {'yes' if r.pipelined else 'no':4} {'yes' if r.v16 else 'no':3}  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doe_kernels.ops.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--kernel", nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        rows = run(cases(args.arch, args.dtype, args.kernel), jobs=args.jobs)
    except AuditUnavailable as exc:
        print(f"audit unavailable: {exc}", file=sys.stderr)
        return 3
    print(format_table(rows))
    bad = [r for r in rows if failures(r)]
    print(f"\n{len(rows)} builds, {len(bad)} failing, {sum(bool(r.pruned) for r in rows)} pruned before launch")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in rows]))
    return 1 if bad else 0


if __name__ == "__main__":
    # The audit compiles for the GPU; the interpreter setting would replace the kernels.
    from doe_kernels.env import interpreting

    if interpreting():
        os.environ.pop("TRITON_INTERPRET")
        os.execv(sys.executable, [sys.executable, "-m", "doe_kernels.ops.audit", *sys.argv[1:]])
    sys.exit(main())
