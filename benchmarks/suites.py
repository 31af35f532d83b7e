"""The contract between the benchmark suites and ``benchmarks.report``: one source for each suite.

A benchmark's ``extra_info`` carries ``suite``, ``group_keys`` (the suite's key fields),
``variant`` and a value for every key field; :meth:`Suite.extra_info` builds exactly that and
refuses a missing key or an unknown variant. The report reads the same :data:`KERNELS`,
:data:`MODEL` and :data:`SWITCH` for its row keys and column order.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Suite", "KERNELS", "MIXED", "MODEL", "MIXED_MODEL", "SWITCH", "GOAL_KEEP", "GOAL_FRACTION", "GOAL_SWITCH_S",
           "GOAL_MIXED", "GENERATE", "GOAL_KERNEL_SLICED", "GOAL_DECODE_ROOFLINE", "GOAL_IDEAL_FRACTION", "PAD"]


@dataclass(frozen=True)
class Suite:
    """A suite's name, the key fields that make a table row, and its variants in column order."""

    name: str
    keys: tuple
    variants: tuple

    def extra_info(self, variant: str, **fields) -> dict:
        """``suite``, ``group_keys``, ``variant`` and ``fields`` (which must hold every key field)."""
        missing = [k for k in self.keys if k not in fields]
        if missing:
            raise ValueError(f"suite {self.name!r}: extra_info lacks key field(s) {missing}")
        if variant not in self.variants:
            raise ValueError(f"suite {self.name!r}: unknown variant {variant!r}; expected one of {self.variants}")
        return {"suite": self.name, "group_keys": list(self.keys), "variant": variant, **fields}


#: benchmarks/test_kernels.py: one gathered GEMM per row.
KERNELS = Suite(
    "kernels",
    keys=("op", "shape", "M", "keep", "dtype"),
    # sliced-pad16: the sliced copy with its width rounded up to a multiple of 16 (zero neurons);
    # gathered-triton-gemv / -dot: the decode launcher forced to one path (M <= 16 only);
    # gather-then-cublas: the kept weights copied, then cuBLAS (M > 16, linear ops only)
    variants=("dense", "sliced", "sliced-pad16", "gathered-triton", "gathered-triton-gemv", "gathered-triton-dot",
              "gather-then-cublas", "gathered-torch"),
)

#: benchmarks/test_kernels.py: one gathered GEMM over a batch whose rows belong to ``groups`` groups.
MIXED = Suite(
    "mixed-kernels",
    keys=("op", "shape", "M", "groups", "keep", "dtype"),
    variants=("dense", "single", "auto", "segmented", "union", "per-group"),
)

#: benchmarks/test_mixed.py: a model forward over a batch of requests from ``tasks`` tasks.
MIXED_MODEL = Suite(
    "mixed",
    keys=("model", "dtype", "keep", "batch", "seq", "tasks"),
    variants=("dense", "single", "mixed", "sequential"),
)

#: benchmarks/test_models.py, forward latency of a whole model; dense is timed with keep None.
MODEL = Suite(
    "model",
    keys=("model", "dtype", "keep", "batch", "seq", "tokens"),
    variants=("dense", "masked", "sliced", "sliced-pad16", "gathered", "compact"),
)

#: benchmarks/test_models.py, the cost of moving between experts; a variant is an op.
SWITCH = Suite(
    "switch",
    keys=("model", "keep"),
    variants=("unplug-first", "switch", "restore", "unplug", "sliced-build", "sliced-copy"),
)

#: benchmarks/test_generate.py: greedy generation end to end; dense is timed with keep None.
GENERATE = Suite(
    "generate",
    keys=("model", "dtype", "keep", "batch", "prompt", "new_tokens", "mode"),
    variants=("dense", "sliced", "gathered"),
)

#: the width multiple of the padded sliced baselines (``sliced-pad16``)
PAD = 16
#: kernel goal: a gathered GEMM takes at most this many times cuBLAS on the best sliced copy
GOAL_KERNEL_SLICED = 1.05
#: decode goal (M <= 16): a gathered GEMM takes at most this many times kept-weight bytes / copy bandwidth
GOAL_DECODE_ROOFLINE = 1.15
#: whole-model goal at keep GOAL_KEEP: the gathered model's speed-up over dense is at least this
#: share of the Amdahl ideal
GOAL_IDEAL_FRACTION = 0.95
#: the model goal: at keep 0.35 the gathered model's speed-up over dense is >= 0.9 x the sliced copy's
GOAL_KEEP = 0.35
GOAL_FRACTION = 0.9
#: the switch goal on a 7B-shaped model: switching experts takes < 1 ms
GOAL_SWITCH_S = 1e-3
#: the mixed-batch goal at keep GOAL_KEEP: a mixed batch costs at most this many times a
#: single-expert batch of the same size (and beats the one-task-at-a-time runtime for >= 2 tasks)
GOAL_MIXED = 1.10
