"""Host-side cost of a gathered wrapper's forward beyond the op it ends in.

    python -m benchmarks.host_overhead [--calls N] [--repeats R] [--stack] [--profile-model] [--out FILE.md]

Tiny shapes (x (1, 32), weight (88, 32), 30 kept neurons) so that the arithmetic is negligible
and the timings are Python / dispatcher time. Each case times the wrapper's ``forward``, the
module call ``module(x)`` (adds ``nn.Module.__call__``, which the original layer pays too) and
the bare op it ends in: on CPU the backend is "torch" and the bare op is the reference
(``gathered_linear_ref`` / ``gathered_glu_ref`` then the down projection's reference); on CUDA
the backend is "triton" and the bare op is the registered kernel op
(``torch.ops.doe_kernels.*``) launched directly. Overhead = forward - bare. Medians of
``time.perf_counter_ns`` over batches of calls, after a warm-up; CUDA calls are not
synchronised inside a batch, so they measure launch (host) time.

``--stack`` (CUDA) times each layer of the call stack of one decode-sized gathered linear on a
LLaMA-7B up projection (x (1, 4096), weight (11008, 4096) bf16, 35% kept): F.linear on a sliced
copy (the bar), the Triton kernel launched through its JIT function with a fixed config, the
same through the autotuner, the launcher (output, split-K partials and their sum), the
registered custom op, the public ``gathered_linear`` (checks) and the wrapper module; the
difference between neighbours is what each layer adds. ``--profile-model`` runs cProfile over
eager forwards of a 2-layer LLaMA-7B-shaped model (batch 1, one token) dense, gathered and
compact and prints the functions that take the most host time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from doe_kernels.env import synchronize
from doe_kernels.modules import GatheredGatedMLP, GatheredLinear
from doe_kernels.reference import gathered_glu_ref, gathered_linear_ref
from doe_kernels.testing import random_indices, rel_err

HIDDEN, INTER, KEPT = 32, 88, 30


def _median_us(fns: list[Callable[[], object]], calls: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Per function: the median over ``repeats`` batches of the mean time of one call in a batch
    of ``calls``. The functions take turns batch by batch, so drift hits them alike."""
    for fn in fns:
        for _ in range(max(calls // 4, 50)):
            fn()
    sync()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter_ns() - start) / calls / 1e3)
            sync()
    return [statistics.median(s) for s in samples]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)


def _cases(device: torch.device):
    """(name, wrapper, input, bare) for rows, cols and the fused gated block."""
    cuda = device.type == "cuda"
    backend = "triton" if cuda else "torch"
    dtype = torch.float16 if cuda else torch.float32
    idx = random_indices(INTER, KEPT, seed=0, dtype=torch.int32, device=device)

    up = nn.Linear(HIDDEN, INTER).to(device, dtype)
    down = nn.Linear(INTER, HIDDEN).to(device, dtype)
    x = torch.randn(1, HIDDEN, device=device, dtype=dtype)
    h = torch.randn(1, KEPT, device=device, dtype=dtype)
    rows = GatheredLinear(up, idx, mode="rows", backend=backend)
    cols = GatheredLinear(down, idx, mode="cols", backend=backend)

    block = _Block().to(device, dtype)
    g, u, d = block.gate_proj, block.up_proj, block.down_proj
    glu = GatheredGatedMLP(block, g, u, d, idx, activation="silu", backend=backend)

    if cuda:
        # the custom ops are registered when their modules are first imported
        import doe_kernels.ops.gathered_glu_kernel  # noqa: F401
        import doe_kernels.ops.gathered_linear_kernel  # noqa: F401

        ops = torch.ops.doe_kernels

        def bare_rows():
            return ops.gathered_linear(x, up.weight, up.bias, idx, True)

        def bare_cols():
            return ops.gathered_linear(h, down.weight, down.bias, idx, False)

        def bare_glu():
            hh = ops.gathered_glu(x, g.weight, u.weight, None, None, idx, "silu")
            return ops.gathered_linear(hh, d.weight, None, idx, False)
    else:
        def bare_rows():
            return gathered_linear_ref(x, up.weight, up.bias, rows=idx)

        def bare_cols():
            return gathered_linear_ref(h, down.weight, down.bias, cols=idx)

        def bare_glu():
            hh = gathered_glu_ref(x, g.weight, u.weight, rows=idx, activation="silu")
            return gathered_linear_ref(hh, d.weight, None, cols=idx)

    return [
        ("GatheredLinear rows", rows, x, bare_rows),
        ("GatheredLinear cols", cols, h, bare_cols),
        ("GatheredGatedMLP (fused)", glu, x, bare_glu),
    ]


def _stack_cases(device: torch.device) -> tuple:
    """([(layer, fn)] from the bare kernel launch up to the module, on a 7B-shaped up projection;
    a check that returns the lowest-level launch's error against the sliced copy)."""
    import triton

    from doe_kernels.ops.api import gathered_linear
    from doe_kernels.ops.gathered_gemv_kernel import _gathered_gemv_kernel, gathered_gemv, gemv_block_m

    dtype = torch.bfloat16
    hidden, inter = 4096, 11008
    kept = int(inter * 0.35)
    idx = random_indices(inter, kept, seed=0, dtype=torch.int32, device=device)
    up = nn.Linear(hidden, inter, bias=False).to(device, dtype)
    w = up.weight
    sliced = w[idx.long()].contiguous()
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_()
    y = torch.empty(1, kept, device=device, dtype=dtype)
    module = GatheredLinear(up, idx, mode="rows", backend="triton")
    args = (x, w, w, idx, y, 1, kept, hidden, x.stride(0), x.stride(1), w.stride(0), w.stride(1), 0, y.stride(0),
            y.stride(1))
    meta = dict(ROWS=True, HAS_BIAS=False, SPLIT_K=1, BLOCK_M=gemv_block_m(1))
    fixed = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2)
    grid_fixed = (triton.cdiv(kept, fixed["BLOCK_N"]), 1)

    def grid(m):
        return (triton.cdiv(kept, m["BLOCK_N"]), 1)

    import doe_kernels.ops.gathered_linear_kernel  # noqa: F401 - registers torch.ops.doe_kernels.gathered_linear

    ops = torch.ops.doe_kernels
    # the compiled kernel launched by Triton's lowest-level entry: no binder, no specialization,
    # no autotuner key (every argument, constexprs included, in signature order)
    every = (*args, *meta.values(), fixed["BLOCK_N"], fixed["BLOCK_K"])
    try:
        launch = _gathered_gemv_kernel.fn[grid_fixed](*args, **meta, **fixed)[grid_fixed]
        launch(*every)
    except Exception as exc:  # noqa: BLE001 - Triton's low-level entry differs between releases: say so
        launch = None
        print(f"CompiledKernel launch unavailable: {type(exc).__name__}: {exc}")
    def through_op():
        with torch.inference_mode(False), torch.enable_grad():
            return gathered_linear(x_grad, w, rows=idx)

    cases = [
        ("torch.empty (1, n)", lambda: torch.empty(1, kept, device=device, dtype=dtype)),
        ("F.linear on the sliced copy", lambda: torch.nn.functional.linear(x, sliced)),
        ("Triton CompiledKernel launch (no binder)", None if launch is None else (lambda: launch(*every))),
        ("Triton JIT launch, fixed config", lambda: _gathered_gemv_kernel.fn[grid_fixed](*args, **meta, **fixed)),
        ("Triton autotuned launch", lambda: _gathered_gemv_kernel[grid](*args, **meta)),
        ("gathered_gemv launcher, split_k=1", lambda: gathered_gemv(x, w, rows=idx, split_k=1)),
        ("gathered_gemv launcher (split-K by size)", lambda: gathered_gemv(x, w, rows=idx)),
        ("custom op (torch.ops.doe_kernels)", lambda: ops.gathered_linear(x, w, None, idx, True)),
        ("gathered_linear, autograd on (through the op)", through_op),
        ("gathered_linear (public, checked)", lambda: gathered_linear(x, w, rows=idx)),
        ("GatheredLinear.forward", lambda: module.forward(x)),
        ("GatheredLinear module()", lambda: module(x)),
    ]

    def check() -> float:
        y.fill_(float("nan"))
        if launch is None:
            _gathered_gemv_kernel.fn[grid_fixed](*args, **meta, **fixed)
        else:
            launch(*every)
        return rel_err(y, torch.nn.functional.linear(x, sliced))

    return cases, check


def stack_table(device: torch.device, calls: int, repeats: int) -> list:
    """Markdown lines: host us per call of each layer of the stack and what it adds."""
    sync = lambda: synchronize(device)  # noqa: E731
    cases, check = _stack_cases(device)
    runnable = []
    with torch.inference_mode():
        for name, fn in cases:
            try:
                if fn is not None:
                    fn()
                    runnable.append((name, fn))
            except Exception as exc:  # noqa: BLE001 - one broken layer must not hide the others
                print(f"{name}: {type(exc).__name__}: {exc}")
        times = dict(zip([n for n, _ in runnable], _median_us([fn for _, fn in runnable], calls, repeats, sync)))
        err = check()
    lines = ["| layer | host us / call | adds us |", "|---|---:|---:|"]
    prev = None
    for name, _ in cases:
        t = times.get(name)
        if t is None:
            lines.append(f"| {name} | failed or unavailable | |")
            continue
        adds = "" if prev is None or name.startswith(("F.linear", "Triton CompiledKernel")) else f"{t - prev:.1f}"
        lines.append(f"| {name} | {t:.1f} | {adds} |")
        prev = t
    lines += ["", f"The lowest-level launch against F.linear on the sliced copy: rel err {err:.2e}."]
    return lines


def profile_model(device: torch.device, forwards: int = 30, top: int = 18) -> list:
    """cProfile of eager forwards (batch 1, one token) of a 2-layer 7B-shaped model: dense, gathered, compact."""
    import doe
    from benchmarks.models import ModelCfg, build_model, make_expert

    cfg = ModelCfg("llama7b-2L", "llama", 4096, 11008, 2, 32, 32, 32000, 4096, "bf16")
    if device.type != "cuda":
        cfg = ModelCfg("llama-tiny", "llama", 128, 344, 2, 4, 4, 512, 128, "fp32")
    dense = build_model(cfg, device)
    gathered = doe.unplug_(build_model(cfg, device), make_expert(dense, 0.35))
    ids = torch.randint(3, cfg.vocab, (1, 1), device=device)
    lines = []
    compact = doe.unplug_(build_model(cfg, device), make_expert(dense, 0.35), compact=True)
    for name, model in (("dense", dense), ("gathered", gathered), ("compact", compact)):
        with torch.inference_mode():
            for _ in range(3):
                model(input_ids=ids, use_cache=False)
            synchronize(device)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(forwards):
                model(input_ids=ids, use_cache=False)
            prof.disable()
            synchronize(device)
            wall = (time.perf_counter() - t0) / forwards * 1e3
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        lines += [f"### {name}: {wall:.2f} ms per forward ({cfg.name}, batch 1, one token, eager, under cProfile)",
                  "", "```", *[ln for ln in buf.getvalue().splitlines() if ln.strip()][-top - 2:], "```", ""]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=15, help="timed batches (the median is reported)")
    parser.add_argument("--stack", action="store_true", help="CUDA: the host cost of each layer of the call stack")
    parser.add_argument("--profile-model", action="store_true", help="cProfile of eager model forwards")
    parser.add_argument("--out", default=None, help="also write the results as markdown here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = lambda: synchronize(device)  # noqa: E731
    bare_name = "kernel op" if device.type == "cuda" else "reference"
    md = [f"# Host cost per call ({device}, torch {torch.__version__})", ""]

    def emit(line: str = "") -> None:
        print(line, flush=True)
        md.append(line)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(md) + "\n")

    emit(f"device: {device}  torch {torch.__version__}  backend: "
         f"{'triton' if device.type == 'cuda' else 'torch'}  (us per call, median)")
    emit("")
    emit(f"| case | {bare_name} us | forward us | module() us | overhead us |")
    emit("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, module, x, bare in _cases(device):
            t_bare, t_fwd, t_call = _median_us(
                [bare, lambda: module.forward(x), lambda: module(x)], args.calls, args.repeats, sync
            )
            emit(f"| {name} | {t_bare:.2f} | {t_fwd:.2f} | {t_call:.2f} | {t_fwd - t_bare:.2f} |")
    if args.stack:
        emit("")
        if device.type != "cuda":
            emit("(--stack: needs CUDA; skipped)")
        else:
            emit("## Call stack of one gathered linear (LLaMA-7B up projection, M = 1, bf16, keep 0.35)")
            emit("")
            try:
                for line in stack_table(device, min(args.calls, 500), args.repeats):
                    emit(line)
            except Exception as exc:  # noqa: BLE001 - the model profile below still runs
                emit(f"(failed: {type(exc).__name__}: {exc})")
    if args.profile_model:
        emit("")
        emit("## cProfile of eager forwards")
        emit("")
        for line in profile_model(device):
            emit(line)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
