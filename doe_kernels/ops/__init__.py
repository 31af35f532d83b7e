"""Gathered ops: the public functions (``api``), one Triton kernel per module, the compile audit."""

from doe_kernels.ops.api import gathered_glu, gathered_linear, segmented_glu, segmented_linear

__all__ = ["gathered_linear", "gathered_glu", "segmented_linear", "segmented_glu"]
