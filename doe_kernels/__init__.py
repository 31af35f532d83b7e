"""doe_kernels: gathered GEMMs that read only the kept neurons of the original weights.

    y = x @ W[idx]^T + b[idx]       gathered_linear(x, W, b, rows=idx)    up / gate / fc1
    y = h @ W[:, idx]^T + b         gathered_linear(h, W, b, cols=idx)    down / fc2
    h = act(x @ Wg[idx]^T) * (x @ Wu[idx]^T)   gathered_glu(...)          gated FFNs

Triton kernels on CUDA, the PyTorch reference (``doe_kernels.reference``) elsewhere. This
package knows nothing about tasks; ``doe`` builds on it.
"""

from doe_kernels._version import __version__
from doe_kernels.dispatch import BACKENDS, resolve_backend, use_backend
from doe_kernels.env import DTYPES, dtype_name, env_flag, interpreting, parse_dtype, synchronize
from doe_kernels.modules import (
    CompactWeights,
    GatheredGatedMLP,
    GatheredLinear,
    is_neuron_major,
    linear_weight,
    to_neuron_major_,
    to_row_major_,
    unwrap,
)
from doe_kernels.ops import gathered_glu, gathered_linear
from doe_kernels.reference import ACTIVATIONS, gathered_glu_ref, gathered_linear_ref
from doe_kernels.validation import validate_indices

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "CompactWeights",
    "DTYPES",
    "GatheredGatedMLP",
    "GatheredLinear",
    "dtype_name",
    "env_flag",
    "gathered_glu",
    "gathered_glu_ref",
    "gathered_linear",
    "gathered_linear_ref",
    "interpreting",
    "is_neuron_major",
    "linear_weight",
    "parse_dtype",
    "resolve_backend",
    "synchronize",
    "to_neuron_major_",
    "to_row_major_",
    "unwrap",
    "use_backend",
    "validate_indices",
]
