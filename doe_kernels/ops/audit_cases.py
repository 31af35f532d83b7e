"""What the compile audit builds: each kernel, config, gather form, dtype and target (a ``Case``),
and the launch arguments each is specialised with."""

from __future__ import annotations

import dataclasses

__all__ = ["ARCHS", "DTYPES", "Case", "GEMV_KERNELS", "GLU_KERNELS", "SEGMENTED_KERNELS", "SEG_DTYPES", "SEG_GROUPS",
           "Ptr", "cases", "kernel_table", "launch_args", "weight_strides"]


#: Realistic sizes (LLaMA-7B FFN at keep 0.35): only their divisibility by 16 reaches the code.
HIDDEN, INTER, KEPT = 4096, 11008, 3853
ARCHS = (90, 80)
DTYPES = ("bf16", "fp16")

@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # a name in kernel_table(): "linear", "glu", "gemv", "glu-gemv", "seg", "seg-glu"
    form: str
    dtype: str
    arch: int
    block: tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    num_warps: int
    num_stages: int
    act: int = 0  # the fused GLU's activation id (ACTIVATION_IDS); 0 elsewhere

    @property
    def config(self) -> str:
        bm, bn, bk, gm = self.block
        act = f" act{self.act}" if self.act else ""
        return f"{bm}x{bn}x{bk} g{gm} w{self.num_warps} s{self.num_stages}{act}"


def kernel_table() -> dict:
    """name -> (autotuned kernel, weight tiles per stage, forms)."""
    from doe_kernels.ops import (
        gathered_gemv_kernel,
        gathered_glu_gemv_kernel,
        gathered_glu_kernel,
        gathered_linear_kernel,
        segmented_glu_kernel,
        segmented_linear_kernel,
    )

    return {
        "linear": (gathered_linear_kernel._gathered_mm_kernel, 1, ("rows/linear", "cols/neuron", "rows/conv1d")),
        "glu": (gathered_glu_kernel._gathered_glu_kernel, 2, ("rows/linear",)),
        "gemv": (gathered_gemv_kernel._gathered_gemv_kernel, 1, ("rows/linear", "cols/neuron", "rows/conv1d")),
        "glu-gemv": (gathered_glu_gemv_kernel._gathered_glu_gemv_kernel, 2, ("rows/linear",)),
        "seg": (segmented_linear_kernel._segmented_mm_kernel, 1, ("rows/linear", "cols/neuron", "rows/conv1d")),
        "seg-glu": (segmented_glu_kernel._segmented_glu_kernel, 2, ("rows/linear",)),
    }


#: Decode (GEMV) kernels: BLOCK_M is set by the launcher from M, audited at its largest.
GEMV_KERNELS = ("gemv", "glu-gemv")
#: Mixed-batch kernels (one launch for rows of several groups), audited with SEG_GROUPS groups.
SEGMENTED_KERNELS = ("seg", "seg-glu")
#: Kernels with a fused activation (the ACT constexpr).
GLU_KERNELS = ("glu", "glu-gemv", "seg-glu")
SEG_GROUPS = 9
#: fp16 builds what bf16 builds for them (same tiles, same registers in the gathered kernels'
#: rows): one 16-bit dtype keeps the audit's cold run short.
SEG_DTYPES = ("bf16",)


class Ptr:
    """What the JIT's binder needs of a tensor argument: a dtype and an aligned address."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def weight_strides(form: str) -> tuple:
    """(N, K, stride_wn, stride_wk) of the (N, K) weight view the kernel reads."""
    if form == "rows/linear":
        return KEPT, HIDDEN, HIDDEN, 1
    if form == "cols/neuron":
        return HIDDEN, KEPT, 1, HIDDEN
    if form == "rows/conv1d":
        return KEPT, HIDDEN, 1, INTER
    raise ValueError(form)


def launch_args(case: Case) -> dict:
    """The kernel's arguments for ``case``, specialised as the JIT specialises them at launch."""
    import torch

    from doe_kernels.env import parse_dtype

    dt = parse_dtype(case.dtype)
    bm, bn, bk, gm = case.block
    M = 16 if bm == 16 else 64 if bm == 32 else 4096
    N, K, swn, swk = weight_strides(case.form)
    p = Ptr(dt)
    common = dict(M=M, N=N, K=K, M_BUCKET=M, stride_xm=K, stride_xk=1, stride_ym=N, stride_yn=1,
                  UPCAST=False, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm)
    if case.kernel == "linear":
        return dict(x_ptr=p, w_ptr=p, b_ptr=p, idx_ptr=Ptr(torch.int32), y_ptr=p,
                    stride_wn=swn, stride_wk=swk, stride_ys=0,
                    ROWS=case.form.startswith("rows"), HAS_BIAS=True, SPLIT_K=1, **common)
    if case.kernel in GEMV_KERNELS:
        gemv = dict(M=bm, N=N, K=K, stride_xm=K, stride_xk=1, stride_wn=swn, stride_wk=swk,
                    SPLIT_K=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        if case.kernel == "gemv":
            return dict(x_ptr=p, w_ptr=p, b_ptr=p, idx_ptr=Ptr(torch.int32), y_ptr=p, stride_ys=0,
                        stride_ym=N, stride_yn=1, ROWS=case.form.startswith("rows"), HAS_BIAS=True, **gemv)
        return dict(x_ptr=p, wg_ptr=p, wu_ptr=p, bg_ptr=p, bu_ptr=p, idx_ptr=Ptr(torch.int32), y_ptr=p,
                    p_ptr=Ptr(torch.float32), stride_un=swn, stride_uk=swk, stride_ym=N, stride_yn=1,
                    HAS_BIAS_G=False, HAS_BIAS_U=False, ACT=case.act, **gemv)
    if case.kernel == "glu":
        return dict(x_ptr=p, wg_ptr=p, wu_ptr=p, bg_ptr=p, bu_ptr=p, idx_ptr=Ptr(torch.int32), y_ptr=p,
                    stride_wn=swn, stride_wk=swk, stride_un=swn, stride_uk=swk,
                    HAS_BIAS_G=False, HAS_BIAS_U=False, ACT=case.act, **common)
    if case.kernel in SEGMENTED_KERNELS:  # 9 resident groups, 8 of them with rows
        seg = dict(idx_ptr=Ptr(torch.int32), rows_ptr=Ptr(torch.int32), G=SEG_GROUPS, ACTIVE=SEG_GROUPS - 1,
                   N_KEY=N, **common)
        if case.kernel == "seg":
            return dict(x_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p, stride_wn=swn, stride_wk=swk, K_KEY=K,
                        ROWS=case.form.startswith("rows"), HAS_BIAS=True, **seg)
        return dict(x_ptr=p, wg_ptr=p, wu_ptr=p, bg_ptr=p, bu_ptr=p, y_ptr=p, stride_wn=swn, stride_wk=swk,
                    stride_un=swn, stride_uk=swk, HAS_BIAS_G=False, HAS_BIAS_U=False, ACT=case.act, **seg)
    raise ValueError(case.kernel)


def cases(archs=ARCHS, dtypes=DTYPES, kernels=None) -> list:
    """Every (kernel, config, form, dtype, target) to build, then each fused kernel's other activations."""
    out = []
    for name, (kernel, _, forms) in kernel_table().items():
        if kernels and name not in kernels:
            continue
        for c in kernel.configs:
            kw = c.kwargs
            if name in GEMV_KERNELS:
                from doe_kernels.ops.gathered_gemv_kernel import GEMV_MAX_M

                block = (GEMV_MAX_M, kw["BLOCK_N"], kw["BLOCK_K"], 0)
            else:
                block = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"])
            for form in forms:
                for dtype in dtypes:
                    if name in SEGMENTED_KERNELS and dtype not in SEG_DTYPES:
                        continue
                    for arch in archs:
                        out.append(Case(name, form, dtype, arch, block, c.num_warps, c.num_stages))
    return out + _activation_cases(out)


def _activation_cases(base: list) -> list:
    """Every other activation of each fused-GLU kernel, compiled once (its first case): the
    GPU compiler refuses what the interpreter lets pass (a non-constexpr global, say)."""
    from doe_kernels.ops._activations import ACTIVATION_IDS

    firsts = {}
    for case in base:
        if case.kernel in GLU_KERNELS:
            firsts.setdefault(case.kernel, case)
    return [dataclasses.replace(case, act=act) for case in firsts.values()
            for act in sorted(set(ACTIVATION_IDS.values()) - {0})]
