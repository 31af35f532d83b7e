"""doe_kernels: gathered GEMMs that read only the kept neurons of the original weights.

    y = x @ W[idx]^T + b[idx]       gathered_linear(x, W, b, rows=idx)    up / gate / fc1
    y = h @ W[:, idx]^T + b         gathered_linear(h, W, b, cols=idx)    down / fc2
    h = act(x @ Wg[idx]^T) * (x @ Wu[idx]^T)   gathered_glu(...)          gated FFNs

Mixed batches (rows of several groups, each with its own kept neurons, in one launch):
``segmented_linear`` / ``segmented_glu`` with a ``GroupedIndices`` (the groups' lists) and a
``TokenGroups`` (each row's group); see ``doe_kernels.segments``.

Triton kernels on CUDA, the PyTorch reference (``doe_kernels.reference``) elsewhere. This
package knows nothing about tasks; ``doe`` builds on it.
"""

from doe_kernels._version import __version__
from doe_kernels.dispatch import BACKENDS, resolve_backend, use_backend
from doe_kernels.env import DTYPES, dtype_name, env_flag, interpreting, parse_dtype, synchronize
from doe_kernels.compact import CompactWeights
from doe_kernels.modules import (
    GatheredGatedMLP,
    GatheredLinear,
    is_neuron_major,
    linear_weight,
    to_neuron_major_,
    to_row_major_,
    unwrap,
)
from doe_kernels.ops import gathered_glu, gathered_linear, segmented_glu, segmented_linear
from doe_kernels.reference import (
    ACTIVATIONS,
    gathered_glu_ref,
    gathered_linear_ref,
    segmented_glu_ref,
    segmented_linear_ref,
)
from doe_kernels.segments import BatchGroups, GroupedIndices, TokenGroups
from doe_kernels.validation import validate_indices

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BatchGroups",
    "CompactWeights",
    "DTYPES",
    "GatheredGatedMLP",
    "GatheredLinear",
    "GroupedIndices",
    "TokenGroups",
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
    "segmented_glu",
    "segmented_glu_ref",
    "segmented_linear",
    "segmented_linear_ref",
    "synchronize",
    "to_neuron_major_",
    "to_row_major_",
    "unwrap",
    "use_backend",
    "validate_indices",
]


def __getattr__(name: str):
    if name == "RowGroups":
        from doe_kernels import segments

        return segments.RowGroups
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
