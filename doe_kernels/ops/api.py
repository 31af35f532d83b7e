"""Public gathered ops: checks, backend dispatch, then the Triton custom op or the reference.

``linear_unchecked`` / ``glu_unchecked`` are the part after the checks, for callers that
guarantee the metadata themselves (the wrapper modules); they are not exported.
"""

from __future__ import annotations

from typing import Optional

import torch

from doe_kernels.dispatch import resolve_backend
from doe_kernels.reference import canonical_activation, gathered_glu_ref, gathered_linear_ref
from doe_kernels.validation import check_glu_args, check_linear_args

__all__ = ["gathered_linear", "gathered_glu"]


def linear_unchecked(x, weight, bias, idx, rows: bool, backend: str) -> torch.Tensor:
    """``gathered_linear`` after its checks: metadata already checked, ``backend`` resolved
    ("triton" or "torch"). ``rows`` True gathers output neurons, False input neurons."""
    if backend == "torch":
        if rows:
            return gathered_linear_ref(x, weight, bias, rows=idx)
        return gathered_linear_ref(x, weight, bias, cols=idx)
    from doe_kernels.ops.gathered_linear import gathered_linear_op

    return gathered_linear_op(x, weight, bias, idx, rows)


def glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation: str, backend: str) -> torch.Tensor:
    """``gathered_glu`` after its checks: metadata already checked, ``activation`` canonical,
    ``backend`` resolved ("triton" or "torch")."""
    if backend == "torch":
        return gathered_glu_ref(
            x, gate_weight, up_weight, rows=idx, activation=activation, gate_bias=gate_bias, up_bias=up_bias
        )
    from doe_kernels.ops.gathered_glu import gathered_glu_op

    return gathered_glu_op(x, gate_weight, up_weight, gate_bias, up_bias, idx, activation)


def gathered_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear`` on the kept rows or columns of ``weight``, reading the original weight.

    x: (..., K), any strides. weight: (N, K_full) as in nn.Linear, any strides (row-major or a
    neuron-major transposed view). bias: (N,) or None. Exactly one of:
      rows: (n,) int32/int64 -> ``F.linear(x, weight[rows], bias[rows])``, x (..., K_full), out (..., n)
      cols: (k,) int32/int64 -> ``F.linear(x, weight[:, cols], bias)``,  x (..., k),      out (..., N)
    Indices are assumed valid (see ``validate_indices``); only metadata is checked here.
    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors).
    """
    idx, form = check_linear_args(x, weight, bias, rows, cols)
    return linear_unchecked(x, weight, bias, idx, form == "rows", resolve_backend(backend, x))


def gathered_glu(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    rows: torch.Tensor,
    activation: str = "silu",
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``act(F.linear(x, Wg[rows], bg[rows])) * F.linear(x, Wu[rows], bu[rows])`` in one kernel.

    x: (..., K); gate_weight, up_weight: (N, K); rows: (n,) int32/int64 -> out (..., n).
    activation: "silu", "gelu" (erf), "gelu_tanh", "relu" (or transformers' aliases such as
    "gelu_pytorch_tanh" / "gelu_new").
    """
    check_glu_args(x, gate_weight, up_weight, rows, gate_bias, up_bias)
    activation = canonical_activation(activation)
    return glu_unchecked(x, gate_weight, up_weight, gate_bias, up_bias, rows, activation, resolve_backend(backend, x))
