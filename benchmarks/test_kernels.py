"""Gathered GEMMs vs dense, sliced copies (the cuBLAS bar) and the torch reference.

Ops (x: (M, H); I = FFN width; n = round(keep * I) kept neurons, sorted unique int32):

- ``up``:   rows gather on an nn.Linear up-projection weight (I, H): ``x @ W[idx]^T + b[idx]``.
- ``down``: cols gather on an nn.Linear down-projection weight (H, I), converted in place to
  neuron-major storage: ``h @ W[:, idx]^T + b`` with h: (M, n).
- ``glu``:  fused ``act(x @ Wg[idx]^T) * (x @ Wu[idx]^T)`` (gated shapes only).

Variants: ``dense`` (F.linear on the full weights: what the unpruned model runs),
``sliced`` (F.linear on pre-made contiguous sliced copies: the speed bar), ``sliced-pad16`` (the
same with the kept width rounded up to a multiple of 16 with zero neurons: cuBLAS picks faster
kernels for aligned widths; skipped where the width is already a multiple; the report's bar is
the faster of the two),
``gathered-triton`` (``doe_kernels`` with backend="triton"), ``gathered-torch``
(``doe_kernels.reference``: index_select + F.linear). At M <= 16 also
``gathered-triton-gemv`` and ``gathered-triton-dot``: the launcher forced to the GEMV (decode)
or the ``tl.dot`` path, to place the GEMV_MAX_M switch; the decode Ms of each sweep
(``DECODE_MS``) add M = 1..16 points for these and the sliced bar. Above M = 16 the linear ops
also time ``gather-then-cublas`` (``path="gather"``: the kept weights copied into a padded
buffer, then cuBLAS), the candidate for large M.

Test ids read ``{op}-{shape}-M{M}-keep{keep}-{dtype}-{variant}``; the structured parameters go
into ``benchmark.extra_info`` (suite "kernels") and ``benchmarks.report`` turns the JSON into a
table and a plot. Timing details (inner loop, warm-up, weight rotation, CUDA graphs): see
``benchmarks/harness.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.suites import KERNELS, MIXED, PAD

from doe_kernels import gathered_glu, gathered_linear, to_neuron_major_
from doe_kernels.ops.gathered_glu_kernel import gathered_glu_mm
from doe_kernels.ops.gathered_linear_kernel import gathered_mm
from doe_kernels.env import interpreting, parse_dtype
from doe_kernels.reference import activation_fn, gathered_glu_ref, gathered_linear_ref
from doe_kernels.testing import kept_count, random_indices, rel_err

OPS = ("up", "down", "glu")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    bias: bool  # up/down projections carry a bias (BERT) or not (LLaMA)
    gated: bool  # the model has a gate projection (glu op applies)
    activation: str


SHAPES = {
    "tiny": Shape("tiny", 64, 176, bias=True, gated=True, activation="silu"),
    "bert-base": Shape("bert-base", 768, 3072, bias=True, gated=False, activation="gelu"),
    "llama7b": Shape("llama7b", 4096, 11008, bias=False, gated=True, activation="silu"),
}

# sweep -> (shapes, Ms, keeps, dtypes). "full" is the CUDA default, "tiny" the CPU default.
SWEEPS = {
    "tiny": (["tiny"], [1, 16], [0.35], ["fp32"]),
    "quick": (["bert-base", "llama7b"], [1, 16, 2048], [0.35], ["bf16"]),
    "campaign": (["llama7b", "bert-base"], [1, 16, 128, 2048, 8192], [0.35, 0.2], ["bf16"]),
    "full": (["bert-base", "llama7b"], [1, 16, 128, 2048, 8192], [0.35, 0.2], ["bf16", "fp16"]),
}

# Extra M points (decode sizes) per sweep, timed for every variant but gathered-torch.
DECODE_MS = {"tiny": [1, 16], "quick": [1, 4, 16], "campaign": [1, 16], "full": [1, 2, 4, 8, 16]}
FORCED_PATHS = {"gathered-triton-gemv": "gemv", "gathered-triton-dot": "dot", "gather-then-cublas": "gather"}
DECODE_PATHS = ("gathered-triton-gemv", "gathered-triton-dot")  # M <= 16 only; the gather path M > 16 only
SLICED = {"sliced": 1, "sliced-pad16": PAD}  # the cuBLAS bars: width multiple
TRITON_VARIANTS = ("gathered-triton", *FORCED_PATHS)

# The Triton interpreter is slow: on CPU, gathered-triton runs only these (op, shape, M) cases.
INTERPRET_CASES = {("up", "tiny", 1), ("down", "tiny", 1), ("glu", "tiny", 1)}


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape
    M: int
    keep: float
    dtype: str
    variant: str
    groups: Optional[int] = None  # mixed-kernels: row m belongs to group m % groups

    @property
    def key(self) -> str:
        """The row's key fields, as the id spells them."""
        k = "" if self.groups is None else f"-k{self.groups}"
        return f"{self.op}-{self.shape.name}-M{self.M}{k}-keep{self.keep:g}-{self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.key}-{self.variant}"

    @property
    def group(self) -> str:
        return self.key if self.groups is None else f"mixed-{self.key}"


def _sweep(shapes: list, keeps: list, dtypes: list):
    """(dtype, keep, op, shape) in sweep order: dtype and keep outermost, so a run cut short by
    DOE_BENCH_BUDGET_S still holds whole (op, shape, M) sweeps for the first dtype / keep ratio;
    ``glu`` only on gated shapes."""
    for dtype in dtypes:
        for keep in keeps:
            for op in OPS:
                for shape_name in shapes:
                    shape = SHAPES[shape_name]
                    if op != "glu" or shape.gated:
                        yield dtype, keep, op, shape


def _cases() -> list:
    name = harness.sweep_name()
    shapes, Ms, keeps, dtypes = SWEEPS[name]
    decode_only = [m for m in DECODE_MS[name] if m not in Ms]
    out = []
    for dtype, keep, op, shape in _sweep(shapes, keeps, dtypes):
        for M in sorted(set(Ms) | set(decode_only)):
            for variant in KERNELS.variants:
                if (variant in DECODE_PATHS) != (M <= 16) and variant in FORCED_PATHS:
                    continue
                if variant == "gather-then-cublas" and op == "glu":
                    continue
                if variant == "gathered-torch" and M in decode_only:
                    continue
                case = Case(op, shape, M, keep, dtype, variant)
                out.append(pytest.param(case, id=case.id))
    return out


def _triton_skip_reason(case: Case, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        if not interpreting():
            return "Triton needs CUDA; set TRITON_INTERPRET=1 to run tiny cases through the interpreter"
        if (case.op, case.shape.name, case.M) not in INTERPRET_CASES:
            return "Triton interpreter: only the cases in INTERPRET_CASES run on CPU (it is slow)"
    return None


# --------------------------------------------------------------------------------------------
# case construction (outside the timed region)
# --------------------------------------------------------------------------------------------


class _Maker:
    """Deterministic random tensors on the benchmark device."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device, dtype=torch.float32, generator=self.gen)
        return (t * scale).to(self.dtype)


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


def _copies(t: Optional[torch.Tensor], n: int) -> list:
    """n tensors with t's values and strides (copy 0 is t itself)."""
    if t is None:
        return [None] * n
    out = [t]
    for _ in range(n - 1):
        c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        c.copy_(t)
        out.append(c)
    return out


def _pad(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``t`` contiguous, with zeros appended along ``dim`` up to a multiple of ``multiple``."""
    extra = -t.shape[dim] % multiple
    if extra:
        shape = list(t.shape)
        shape[dim] = extra
        t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    return t.contiguous()


def _nbytes(*ts: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _linear_call(v: str, x, w, b, **gather) -> Callable[[], torch.Tensor]:
    """Variant ``v`` of a linear op on ``x``: F.linear for dense and sliced weights, else the
    gathered op on ``gather`` (``rows=`` or ``cols=``)."""
    if v == "dense" or v in SLICED:
        return lambda: F.linear(x, w, b)
    if v == "gathered-torch":
        return lambda: gathered_linear_ref(x, w, b, **gather)
    if v in FORCED_PATHS:
        return lambda: gathered_mm(x, w, bias=b, path=FORCED_PATHS[v], **gather)
    return lambda: gathered_linear(x, w, b, backend="triton", **gather)


def _build(case: Case, device: torch.device):
    """Returns (calls, check, meta): one zero-arg callable per rotated weight copy, a callable
    that returns (output, reference output) for gathered-triton (else None), and the
    extra_info fields that describe the problem."""
    shape, dtype = case.shape, parse_dtype(case.dtype)
    H, I, M = shape.hidden, shape.inter, case.M
    mk = _Maker(device, dtype)
    idx = random_indices(I, kept_count(I, case.keep), seed=1, dtype=torch.int32, device=device)
    n = idx.numel()
    idx_long = idx.long()
    es = torch.empty((), dtype=dtype).element_size()
    v = case.variant
    meta = {"H": H, "I": I, "n_keep": n, "bias": shape.bias}

    if case.op in ("up", "glu"):
        # weights (I, H): the neuron axis is already the outer storage axis.
        nw = 2 if case.op == "glu" else 1
        x = mk.randn(M, H)
        ws = [mk.randn(I, H, scale=H**-0.5) for _ in range(nw)]
        bs = [mk.randn(I, scale=0.1) if (shape.bias and case.op == "up") else None for _ in range(nw)]
        kept_bytes = nw * n * H * es + sum(n * es for b in bs if b is not None)
        dense_bytes = _nbytes(*ws, *bs)
        meta.update(N=n, K=H, flops=2 * nw * M * n * H, bias=any(b is not None for b in bs))
        if v in SLICED:
            ws = [_pad(w.index_select(0, idx_long), 0, SLICED[v]) for w in ws]
            bs = [_pad(b.index_select(0, idx_long), 0, SLICED[v]) if b is not None else None for b in bs]
        read_bytes = dense_bytes if v == "dense" else kept_bytes
        ncopy = harness.rotation_copies(device, read_bytes, _nbytes(*ws, *bs))
        wsets = list(zip(*[_copies(w, ncopy) for w in ws], *[_copies(b, ncopy) for b in bs]))
        act = activation_fn(shape.activation)

        def make_call(wset) -> Callable[[], torch.Tensor]:
            w_list, b_list = list(wset[:nw]), list(wset[nw:])
            if case.op == "up":
                (w,), (b,) = w_list, b_list
                return _linear_call(v, x, w, b, rows=idx)
            wg, wu = w_list
            if v == "dense" or v in SLICED:
                return lambda: act(F.linear(x, wg)) * F.linear(x, wu)
            if v == "gathered-torch":
                return lambda: gathered_glu_ref(x, wg, wu, rows=idx, activation=shape.activation)
            if v in FORCED_PATHS:
                return lambda: gathered_glu_mm(x, wg, wu, rows=idx, activation=shape.activation, path=FORCED_PATHS[v])
            return lambda: gathered_glu(x, wg, wu, rows=idx, activation=shape.activation, backend="triton")

        def check():
            wg, wu = ws[0], ws[-1]
            if case.op == "up":
                return make_call(wsets[0])(), gathered_linear_ref(x, wg, bs[0], rows=idx)
            return make_call(wsets[0])(), gathered_glu_ref(x, wg, wu, rows=idx, activation=shape.activation)

    else:  # down: nn.Linear weight (H, I), converted in place to neuron-major storage
        w = _param(mk.randn(H, I, scale=I**-0.5))
        to_neuron_major_(w, 1)
        assert w.stride() == (1, H), f"to_neuron_major_ left strides {w.stride()}"
        b = mk.randn(H, scale=0.1) if shape.bias else None
        h = mk.randn(M, n)
        kept_bytes = H * n * es + _nbytes(b)
        dense_bytes = _nbytes(w, b)
        meta.update(N=H, K=n, flops=2 * M * H * n, layout="neuron-major")
        if v == "dense":
            x_in = mk.randn(M, I)
        elif v in SLICED:  # what slicing an nn.Linear gives: row-major (H, n), zero columns to the padded width
            w = _pad(w.index_select(1, idx_long), 1, SLICED[v])
            x_in = _pad(h, 1, SLICED[v])
        else:
            x_in = h
        read_bytes = dense_bytes if v == "dense" else kept_bytes
        ncopy = harness.rotation_copies(device, read_bytes, _nbytes(w, b))
        wsets = list(zip(_copies(w.detach(), ncopy), _copies(b, ncopy)))

        def make_call(wset) -> Callable[[], torch.Tensor]:
            wc, bc = wset
            return _linear_call(v, x_in, wc, bc, cols=idx)

        def check():
            return make_call(wsets[0])(), gathered_linear_ref(h, w.detach(), b, cols=idx)

    meta.update(kept_weight_bytes=kept_bytes, dense_weight_bytes=dense_bytes)
    calls = [make_call(ws_) for ws_ in wsets]
    return calls, (check if v in TRITON_VARIANTS else None), meta


# fp32 on GPU runs TF32 tl.dot by default (errors ~1e-3 relative to max); 16-bit: a few ulps.
_TOL = {"fp32": 1e-2, "bf16": 3e-2, "fp16": 1e-2}


@pytest.mark.parametrize("case", _cases())
def test_gathered_gemm(benchmark, case: Case, bench_device, device_info):
    if case.variant in TRITON_VARIANTS:
        reason = _triton_skip_reason(case, bench_device)
        if reason:
            pytest.skip(reason)
    if case.variant == "sliced-pad16" and kept_count(case.shape.inter, case.keep) % PAD == 0:
        pytest.skip(f"the kept width is already a multiple of {PAD}: sliced-pad16 is sliced")
    torch.manual_seed(0)
    calls, check, meta = _build(case, bench_device)

    info = benchmark.extra_info
    info.update(device_info)
    info.update(
        KERNELS.extra_info(case.variant, op=case.op, shape=case.shape.name, M=case.M, keep=case.keep, dtype=case.dtype),
        **meta,
    )
    if case.op == "glu":
        info["activation"] = case.shape.activation
    benchmark.group = case.group

    if check is not None:  # outside the timed region: the numbers are for the right op
        with torch.inference_mode():
            out, ref = check()
        err = rel_err(out, ref)
        info["max_rel_err"] = err
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert math.isfinite(err) and err <= _TOL[case.dtype], f"{case.variant} vs reference: rel err {err:.3g}"

    slow = case.variant in TRITON_VARIANTS and bench_device.type != "cuda"
    harness.run_timed(benchmark, calls, bench_device, slow=slow)


# --------------------------------------------------------------------------------------------
# mixed batches: rows of k groups (tasks) in one batch, each with its own kept neurons
# --------------------------------------------------------------------------------------------
#
# Suite "mixed-kernels" (ids ``{op}-{shape}-M{M}-k{groups}-keep{keep}-{dtype}-{variant}``):
# M rows, row m in group m % k, each group keeping its own random neurons (kept_count(I, keep)).
# Variants, all on the backend "auto" picks (Triton on CUDA, the reference on CPU):
#   dense      F.linear on the full weights (every row dense)
#   single     every row on group 0's list: a single-expert batch of the same size (the bar:
#              goal auto/single <= 1.10 at keep 0.35)
#   auto       segmented_linear / segmented_glu with path="auto" (what the modules run)
#   segmented  path="segmented": one launch, every tile on its group's list
#   union      path="union": the union of the groups' lists once, per-row masks (decode)
#   per-group  one gathered op per group on its own rows: the one-task-at-a-time runtime

MIXED_SWEEPS = {
    "tiny": (["tiny"], [8, 64], [1, 2, 4, 8], [0.35], ["fp32"]),
    "quick": (["llama7b"], [8, 512, 4096], [1, 2, 4, 8], [0.35], ["bf16"]),
    "campaign": (["llama7b"], [16, 4096], [1, 2, 4, 8], [0.35], ["bf16"]),
    "full": (["bert-base", "llama7b"], [1, 4, 8, 16, 64, 512, 4096], [1, 2, 4, 8], [0.35], ["bf16"]),
}
MIXED_PATHS = {"auto": "auto", "segmented": "segmented", "union": "union"}


def _mixed_cases() -> list:
    shapes, Ms, ks, keeps, dtypes = MIXED_SWEEPS[harness.sweep_name()]
    out = []
    for dtype, keep, op, shape in _sweep(shapes, keeps, dtypes):
        for M in Ms:
            for k in ks:
                if k > M:
                    continue
                for variant in MIXED.variants:
                    case = Case(op, shape, M, keep, dtype, variant, groups=k)
                    out.append(pytest.param(case, id=case.id))
    return out


def _build_mixed(case: Case, device: torch.device):
    """(calls, check, meta) as ``_build`` returns them, for a mixed batch."""
    from doe_kernels.ops.api import segmented_glu, segmented_linear
    from doe_kernels.segments import GroupedIndices, TokenGroups, choose_path, mixed_width

    shape, dtype = case.shape, parse_dtype(case.dtype)
    H, I, M, k = shape.hidden, shape.inter, case.M, case.groups
    mk = _Maker(device, dtype)
    gen = torch.Generator().manual_seed(1)
    lists = [random_indices(I, kept_count(I, case.keep), generator=gen, dtype=torch.int32) for _ in range(k)]
    grouped = GroupedIndices(lists, I, device)
    items = [m % k for m in range(M)]
    groups = TokenGroups.build(items, k, device=device)
    path = choose_path(grouped, groups, MIXED_PATHS.get(case.variant, "auto"))
    own = [torch.tensor([m for m in range(M) if m % k == g], device=device) for g in range(k)]
    staged = [idx.to(device) for idx in lists]
    v = case.variant
    es = torch.empty((), dtype=dtype).element_size()
    nw = {"up": 1, "glu": 2, "down": 1}[case.op]
    bias = shape.bias and case.op == "up"
    if case.op == "down":
        w = _param(mk.randn(H, I, scale=I**-0.5))
        to_neuron_major_(w, 1)
        ws, bs = [w.detach()], [mk.randn(H, scale=0.1) if shape.bias else None]
    else:
        ws = [mk.randn(I, H, scale=H**-0.5) for _ in range(nw)]
        bs = [mk.randn(I, scale=0.1) if bias else None for _ in range(nw)]
    x = mk.randn(M, H)
    if case.op == "down":  # h as the rows gather of this path laid it out
        x = mk.randn(M, I if v == "dense" else mixed_width(grouped, groups, "segmented" if v == "per-group" else path))
    parts = [x.index_select(0, rows) for rows in own]  # the per-task sub-batches, split beforehand
    if case.op == "down" and v == "per-group":
        parts = [p[:, : idx.numel()].contiguous() for p, idx in zip(parts, lists)]
    if case.op == "down" and v == "single":
        x = x[:, : lists[0].numel()].contiguous()
    read = {"dense": I, "single": len(lists[0]), "per-group": sum(map(len, lists))}.get(v)
    if read is None:
        read = mixed_width(grouped, groups, path) if path == "union" else sum(len(lists[g]) for g in groups.active)
    meta = {"H": H, "I": I, "n_keep": len(lists[0]), "path": path, "read_neurons": read,
            "kept_weight_bytes": nw * read * H * es}
    ncopy = harness.rotation_copies(device, nw * read * H * es, _nbytes(*ws, *bs))
    wsets = list(zip(*[_copies(t, ncopy) for t in ws], *[_copies(t, ncopy) for t in bs]))
    act = activation_fn(shape.activation)
    kw = {"rows": grouped} if case.op != "down" else {"cols": grouped}

    def make_call(wset) -> Callable[[], object]:
        ww, bb = list(wset[:nw]), list(wset[nw:])
        if case.op == "glu":
            wg, wu = ww
            if v == "dense":
                return lambda: act(F.linear(x, wg)) * F.linear(x, wu)
            if v == "single":
                return lambda: gathered_glu(x, wg, wu, rows=staged[0], activation=shape.activation)
            if v == "per-group":
                return lambda: [gathered_glu(p, wg, wu, rows=idx, activation=shape.activation)
                                for p, idx in zip(parts, staged)]
            return lambda: segmented_glu(x, wg, wu, rows=grouped, groups=groups, activation=shape.activation,
                                         path=path)
        (w,), (b,) = ww, bb
        key = "rows" if case.op == "up" else "cols"
        if v == "dense":
            return lambda: F.linear(x, w, b)
        if v == "single":
            return lambda: gathered_linear(x, w, b, **{key: staged[0]})
        if v == "per-group":
            return lambda: [gathered_linear(p, w, b, **{key: idx}) for p, idx in zip(parts, staged)]
        return lambda: segmented_linear(x, w, b, **kw, groups=groups, path=path)

    def check():
        """The mixed result against the reference run group by group."""
        out = make_call(wsets[0])()
        ref = (segmented_glu(x, ws[0], ws[1], rows=grouped, groups=groups, activation=shape.activation, path=path,
                             backend="torch") if case.op == "glu"
               else segmented_linear(x, ws[0], bs[0], **kw, groups=groups, path=path, backend="torch"))
        return out, ref

    calls = [make_call(s) for s in wsets]
    return calls, (check if v in MIXED_PATHS else None), meta


@pytest.mark.parametrize("case", _mixed_cases())
def test_mixed_gemm(benchmark, case: Case, bench_device, device_info):
    torch.manual_seed(0)
    calls, check, meta = _build_mixed(case, bench_device)
    info = benchmark.extra_info
    info.update(device_info)
    info.update(MIXED.extra_info(case.variant, op=case.op, shape=case.shape.name, M=case.M, groups=case.groups,
                                 keep=case.keep, dtype=case.dtype), **meta)
    info["backend"] = "triton" if bench_device.type == "cuda" else "torch"
    benchmark.group = case.group
    if check is not None:
        with torch.inference_mode():
            out, ref = check()
        err = rel_err(out, ref)
        info["max_rel_err"] = err
        assert out.shape == ref.shape and math.isfinite(err) and err <= _TOL[case.dtype], (out.shape, ref.shape, err)
    harness.run_timed(benchmark, calls, bench_device)
