"""Activations of the fused GLU kernels, selected by a constexpr id."""

import triton
import triton.language as tl

__all__ = ["ACTIVATION_IDS", "apply_activation"]

#: Activation ids understood by the kernel (a constexpr selects the branch).
ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# Globals a kernel reads must be constexpr: the GPU compiler refuses plain Python floats (the
# interpreter does not check).
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def apply_activation(g, ACT: tl.constexpr):
    if ACT == 0:
        out = g * tl.sigmoid(g)
    elif ACT == 1:
        out = 0.5 * g * (1.0 + tl.math.erf(g * _SQRT_HALF))
    elif ACT == 2:
        # tanh(z) = 2 * sigmoid(2z) - 1; |z| <= 20 already gives tanh = +-1 in fp32.
        inner = tl.minimum(tl.maximum(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g), -20.0), 20.0)
        out = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    else:
        out = tl.maximum(g, 0.0)
    return out
