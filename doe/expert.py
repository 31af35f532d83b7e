"""TaskExpert: the kept FFN neurons of one task (plus its soft prompt and head).

An expert is small: one sorted, unique int32 index tensor per FFN block, in the order the
architecture registry lists the blocks (module order; T5: encoder blocks, then decoder
blocks). It is validated once, on construction, so installing and switching never has to
check values on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from doe.architectures import FFNSpec, find_ffn_blocks
from doe_kernels import validate_indices

__all__ = ["TaskExpert", "model_type_of"]


def model_type_of(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


@dataclass
class TaskExpert:
    """Per-FFN-block kept neuron ids for one task.

    indices: one (n_i,) int32 tensor per FFN block, sorted ascending and unique, n_i >= 1.
    num_neurons: the intermediate size of each block the expert was built for.
    model_type: config.model_type of that model (None for a user-described architecture).
    prompt: optional (n_tokens, hidden) soft prompt; head: optional state dict of a small
    task head; both are filled by localization. metadata: free-form, JSON-serialisable.
    """

    indices: list[torch.Tensor]
    num_neurons: list[int]
    model_type: Optional[str] = None
    task: Optional[str] = None
    prompt: Optional[torch.Tensor] = None
    head: Optional[dict[str, torch.Tensor]] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.indices, (list, tuple)) or not self.indices:
            raise ValueError(f"indices: expected a non-empty list with one index tensor per FFN block, "
                             f"got {type(self.indices).__name__}")
        self.num_neurons = [int(n) for n in self.num_neurons]
        if len(self.num_neurons) != len(self.indices):
            raise ValueError(f"num_neurons has {len(self.num_neurons)} entries but indices has "
                             f"{len(self.indices)} FFN blocks")
        for i, n in enumerate(self.num_neurons):
            if n < 1:
                raise ValueError(f"num_neurons[{i}]: expected a positive neuron count, got {n}")
        self.indices = [
            validate_indices(idx, n, name=f"FFN block {i} indices").cpu()
            for i, (idx, n) in enumerate(zip(self.indices, self.num_neurons))
        ]
        if self.prompt is not None and (not isinstance(self.prompt, torch.Tensor) or self.prompt.dim() != 2):
            raise ValueError("prompt: expected a (n_tokens, hidden) tensor, got "
                             f"{getattr(self.prompt, 'shape', type(self.prompt).__name__)}")

    @classmethod
    def from_indices(
        cls,
        model: nn.Module,
        indices: Sequence[Any],
        *,
        task: Optional[str] = None,
        spec: FFNSpec | Sequence[FFNSpec] | None = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> "TaskExpert":
        """Build an expert by hand: ``indices`` holds one 1-D integer tensor (or list) per FFN
        block of ``model``, in registry order. Each is sorted here; duplicates, out-of-range
        values and empty blocks are errors."""
        blocks = find_ffn_blocks(model, spec)
        if len(indices) != len(blocks):
            raise ValueError(f"indices: expected {len(blocks)} index tensors (one per FFN block of this "
                             f"{model_type_of(model) or type(model).__name__} model), got {len(indices)}")
        sorted_indices = []
        for i, idx in enumerate(indices):
            t = torch.as_tensor(idx)
            if t.dtype in (torch.int32, torch.int64) and t.dim() == 1:
                t = t.sort().values
            sorted_indices.append(t)
        return cls(
            indices=sorted_indices,
            num_neurons=[b.num_neurons for b in blocks],
            model_type=model_type_of(model),
            task=task,
            metadata=dict(metadata or {}),
        )

    @property
    def num_blocks(self) -> int:
        return len(self.indices)

    @property
    def kept(self) -> list[int]:
        return [int(i.numel()) for i in self.indices]

    @property
    def keep_ratio(self) -> float:
        """Kept neurons over all FFN neurons."""
        return sum(self.kept) / sum(self.num_neurons)

    def __repr__(self) -> str:
        return (f"TaskExpert(task={self.task!r}, model_type={self.model_type!r}, blocks={self.num_blocks}, "
                f"kept={sum(self.kept)}/{sum(self.num_neurons)} ({self.keep_ratio:.1%}))")
