"""Gathered ops: the public functions (``api``), one Triton kernel per ``*_kernel`` module
(imported on the first Triton call, so triton is needed only then), the compile audit."""

from doe_kernels.ops.api import gathered_glu, gathered_linear, segmented_glu, segmented_linear

__all__ = ["gathered_linear", "gathered_glu", "segmented_linear", "segmented_glu"]
