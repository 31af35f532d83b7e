"""TaskExpert: the kept FFN neurons of one task (plus its soft prompt and head).

An expert is small: one sorted, unique int32 index tensor per FFN block, in the order the
architecture registry lists the blocks (module order; T5: encoder blocks, then decoder
blocks). It is validated once, on construction, so installing and switching never has to
check values on the GPU.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from doe.architectures import FFNBlock, FFNSpec, find_ffn_blocks
from doe_kernels import validate_indices

__all__ = ["TaskExpert", "model_type_of", "model_fingerprint", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_VERSION = 1
CONFIG_NAME = "expert_config.json"
WEIGHTS_NAME = "expert.safetensors"

# Config keys that describe a model's structure (names differ across families).
_STRUCTURE_KEYS = (
    "model_type", "hidden_size", "d_model", "n_embd", "dim", "num_hidden_layers", "num_layers", "n_layer",
    "num_decoder_layers", "vocab_size", "intermediate_size", "d_ff", "n_inner", "ffn_dim", "hidden_dim",
    "num_attention_heads", "n_head", "num_heads", "hidden_act", "activation_function", "feed_forward_proj",
)


def model_type_of(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def model_fingerprint(model: nn.Module, blocks: Optional[Sequence[FFNBlock]] = None) -> str:
    """sha256 (16 hex chars) of the model's structural config keys and its FFN block shapes.

    Two loads of one checkpoint, or a fine-tuned copy of it, share a fingerprint; a model of
    another size or family does not. ``blocks`` defaults to ``find_ffn_blocks(model)``.
    """
    config = getattr(model, "config", None)
    structure = {k: getattr(config, k) for k in _STRUCTURE_KEYS if config is not None and hasattr(config, k)}
    if blocks is None:
        blocks = find_ffn_blocks(model)
    structure["ffn"] = [[b.name, b.kind, b.num_neurons, b.hidden_size, b.gated] for b in blocks]
    text = json.dumps(structure, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class TaskExpert:
    """Per-FFN-block kept neuron ids for one task.

    indices: one (n_i,) int32 tensor per FFN block, sorted ascending and unique, n_i >= 1.
    num_neurons: the intermediate size of each block the expert was built for.
    model_type: config.model_type of that model (None for a user-described architecture).
    fingerprint: ``model_fingerprint`` of that model; unplugging into a model with another
    fingerprint fails.
    prompt: optional (n_tokens, hidden) soft prompt; head: optional state dict of a small
    task head, both tuned for the expert-localized model. dense_prompt / dense_head: the same
    for the dense model (the runtime falls back to them). All are filled by localization.
    metadata: free-form, JSON-serialisable.
    """

    indices: list[torch.Tensor]
    num_neurons: list[int]
    model_type: Optional[str] = None
    task: Optional[str] = None
    fingerprint: Optional[str] = None
    prompt: Optional[torch.Tensor] = None
    head: Optional[dict[str, torch.Tensor]] = None
    dense_prompt: Optional[torch.Tensor] = None
    dense_head: Optional[dict[str, torch.Tensor]] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    _staged: dict[str, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        for name in ("prompt", "dense_prompt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
                raise ValueError(f"{name}: expected a (n_tokens, hidden) tensor, got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")

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
        if not isinstance(indices, (list, tuple)):
            raise TypeError(f"indices: expected a list with one index tensor per FFN block, got {type(indices).__name__}")
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
            fingerprint=model_fingerprint(model, blocks),
            metadata=dict(metadata or {}),
        )

    def stage(self, device: torch.device | str) -> list[torch.Tensor]:
        """The index lists on ``device``, copied there once and cached, so that switching to
        this expert later moves no bytes at all."""
        key = str(torch.device(device))
        if key not in self._staged:
            self._staged[key] = [idx.to(device) for idx in self.indices]
        return self._staged[key]

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

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``expert_config.json`` and ``expert.safetensors`` (indices, prompt, head) to a folder."""
        from safetensors.torch import save_file

        from doe import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"indices.{i}": idx.contiguous() for i, idx in enumerate(self.indices)}
        for prefix in ("", "dense_"):
            prompt, head = getattr(self, prefix + "prompt"), getattr(self, prefix + "head")
            if prompt is not None:
                tensors[prefix + "prompt"] = prompt.detach().float().cpu().contiguous()
            for key, value in (head or {}).items():
                tensors[f"{prefix}head.{key}"] = value.detach().float().cpu().contiguous()
        config = {
            "format_version": FORMAT_VERSION,
            "doe_version": __version__,
            "task": self.task,
            "model_type": self.model_type,
            "model_name": self.metadata.get("model_name"),
            "fingerprint": self.fingerprint,
            "method": self.metadata.get("method"),
            "keep_ratio": self.keep_ratio,
            "num_neurons": self.num_neurons,
            "kept": self.kept,
            "prompt_tokens": None if self.prompt is None else int(self.prompt.shape[0]),
            "head_keys": sorted(self.head or {}),
            "dense_head_keys": sorted(self.dense_head or {}),
            "metadata": self.metadata,
        }
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "doe-expert"})
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TaskExpert":
        """Load and validate an expert folder written by ``save_pretrained``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"not an expert folder: {path} is missing (expected {CONFIG_NAME} and "
                                        f"{WEIGHTS_NAME}, as written by TaskExpert.save_pretrained)")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path}: corrupted expert config ({exc})") from exc
        if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
            found = config.get("format_version") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"{config_path}: expected format_version {FORMAT_VERSION}, got {found!r}")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{weights_path}: truncated or corrupted safetensors file ({exc})") from exc
        num_neurons = config.get("num_neurons")
        if not isinstance(num_neurons, list):
            raise ValueError(f"{config_path}: 'num_neurons' must be a list, got {num_neurons!r}")
        missing = [f"indices.{i}" for i in range(len(num_neurons)) if f"indices.{i}" not in tensors]
        if missing:
            raise ValueError(f"{weights_path}: missing {missing} for the {len(num_neurons)} FFN blocks in the config")
        heads = {}
        for prefix in ("", "dense_"):
            keys = config.get(prefix + "head_keys") or []
            missing = [k for k in keys if f"{prefix}head.{k}" not in tensors]
            if missing:
                raise ValueError(f"{weights_path}: {prefix}head tensors {missing} are missing")
            heads[prefix] = {k: tensors[f"{prefix}head.{k}"] for k in keys} or None
        expert = cls(
            indices=[tensors[f"indices.{i}"] for i in range(len(num_neurons))],
            num_neurons=num_neurons,
            model_type=config.get("model_type"),
            task=config.get("task"),
            fingerprint=config.get("fingerprint"),
            prompt=tensors.get("prompt"),
            head=heads[""],
            dense_prompt=tensors.get("dense_prompt"),
            dense_head=heads["dense_"],
            metadata=dict(config.get("metadata") or {}),
        )
        if expert.kept != config.get("kept"):
            raise ValueError(f"{directory}: kept counts {expert.kept} disagree with the config's {config.get('kept')}")
        return expert
