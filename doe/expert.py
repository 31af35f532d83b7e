"""TaskExpert: the kept FFN neurons of one task (plus its soft prompt and head).

An expert is small: one sorted, unique int32 index tensor per FFN block, in the order the
architecture registry lists the blocks (module order; T5: encoder blocks, then decoder
blocks). It is validated once, on construction, so installing and switching never has to
check values on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import operator
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from doe.architectures import FFNBlock, FFNSpec, find_ffn_blocks
from doe.folders import atomic_folder
from doe.locking import model_lock
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
        with model_lock(model):
            blocks = find_ffn_blocks(model)
    structure["ffn"] = [[b.name, b.kind, b.num_neurons, b.hidden_size, b.gated] for b in blocks]
    text = json.dumps(structure, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _neuron_count(value: Any, i: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError as exc:
        raise TypeError(f"num_neurons[{i}]: expected an integer neuron count, got {value!r}") from exc
    if n < 1:
        raise ValueError(f"num_neurons[{i}]: expected a positive neuron count, got {n}")
    return n


def _digest(indices: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for idx in indices:
        h.update(len(idx).to_bytes(8, "little"))
        h.update(idx.numpy().tobytes())
    return h.hexdigest()[:16]


class TaskExpert:
    """Per-FFN-block kept neuron ids for one task.

    Args:
        indices: one (n_i,) integer tensor (or list) per FFN block, sorted ascending and
            unique, 1 <= n_i <= num_neurons[i]. Copied and validated here; afterwards
            ``expert.indices`` hands out copies, so nothing outside can change what was
            validated.
        num_neurons: the intermediate size of each block the expert was built for.
        model_type: config.model_type of that model (None for a user-described architecture).
        task: the task's name.
        fingerprint: ``model_fingerprint`` of that model; unplugging into a model with another
            fingerprint fails.
        prompt: optional (n_tokens, hidden) soft prompt; head: optional state dict of a small
            task head, both tuned for the expert-localized model. dense_prompt / dense_head:
            the same for the dense model (the runtime falls back to them). All are filled by
            localization.
        offsets: optional, one (hidden,) tensor or None per FFN block, added to the block's
            output while the expert runs: the mean contribution of the neurons it leaves out
            (bias compensation), measured on the task's data.
        metadata: free-form, JSON-serialisable.

    Two experts are equal when their indices, sizes, model type, fingerprint, task, prompts,
    heads, offsets and metadata are; the hash covers the (immutable) indices and sizes only.
    """

    def __init__(
        self,
        indices: Sequence[Any],
        num_neurons: Sequence[int],
        model_type: Optional[str] = None,
        task: Optional[str] = None,
        fingerprint: Optional[str] = None,
        prompt: Optional[torch.Tensor] = None,
        head: Optional[dict[str, torch.Tensor]] = None,
        dense_prompt: Optional[torch.Tensor] = None,
        dense_head: Optional[dict[str, torch.Tensor]] = None,
        metadata: Optional[dict[str, Any]] = None,
        offsets: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> None:
        if not isinstance(indices, (list, tuple)) or not indices:
            raise ValueError(f"indices: expected a non-empty list with one index tensor per FFN block, "
                             f"got {type(indices).__name__}")
        if not isinstance(num_neurons, (list, tuple)):
            raise TypeError(f"num_neurons: expected a list of neuron counts, got {type(num_neurons).__name__}")
        sizes = tuple(_neuron_count(n, i) for i, n in enumerate(num_neurons))
        if len(sizes) != len(indices):
            raise ValueError(f"num_neurons has {len(sizes)} entries but indices has {len(indices)} FFN blocks")
        # clone(): the caller's tensors never become the expert's (or a live model's) indices.
        # Normal tensors even under inference_mode: their version counters guard them.
        with torch.inference_mode(False):
            self._indices = tuple(
                validate_indices(idx, n, name=f"FFN block {i} indices").cpu().clone()
                for i, (idx, n) in enumerate(zip(indices, sizes))
            )
        self._num_neurons = sizes
        self._versions = tuple(t._version for t in self._indices)
        self._digest = _digest(self._indices)
        self._staged: dict[str, tuple[tuple[torch.Tensor, ...], tuple[int, ...]]] = {}
        for name, value in (("prompt", prompt), ("dense_prompt", dense_prompt)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
                raise ValueError(f"{name}: expected a (n_tokens, hidden) tensor, got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
        for name, value in (("head", head), ("dense_head", dense_head)):
            if value is not None and not (isinstance(value, dict)
                                          and all(isinstance(v, torch.Tensor) for v in value.values())):
                raise TypeError(f"{name}: expected a state dict (str -> tensor), got {type(value).__name__}")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
        if offsets is not None:
            if not isinstance(offsets, (list, tuple)) or len(offsets) != len(sizes):
                raise ValueError(f"offsets: expected one tensor or None per FFN block ({len(sizes)}), got "
                                 f"{len(offsets) if isinstance(offsets, (list, tuple)) else type(offsets).__name__}")
            for i, o in enumerate(offsets):
                if o is not None and (not isinstance(o, torch.Tensor) or o.dim() != 1 or not o.is_floating_point()
                                      or not torch.isfinite(o).all()):
                    raise ValueError(f"offsets[{i}]: expected a finite 1-D float tensor (hidden,) or None, got "
                                     f"{getattr(o, 'shape', type(o).__name__)}")
            offsets = tuple(None if o is None else o.detach().float().cpu().clone() for o in offsets)
            if all(o is None for o in offsets):
                offsets = None
        self.offsets: Optional[tuple] = offsets
        self.model_type, self.task, self.fingerprint = model_type, task, fingerprint
        self.prompt, self.head = prompt, head
        self.dense_prompt, self.dense_head = dense_prompt, dense_head
        self.metadata = dict(metadata or {})

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
        values and empty blocks are errors. Works on an unplugged model too."""
        if not isinstance(indices, (list, tuple)):
            raise TypeError(f"indices: expected a list with one index tensor per FFN block, got {type(indices).__name__}")
        with model_lock(model):
            blocks = find_ffn_blocks(model, spec)
            fingerprint = model_fingerprint(model, blocks)
        if len(indices) != len(blocks):
            raise ValueError(f"indices: expected {len(blocks)} index tensors (one per FFN block of this "
                             f"{model_type_of(model) or type(model).__name__} model), got {len(indices)}")
        sorted_indices = []
        for idx in indices:
            t = torch.as_tensor(idx)
            if t.dtype in (torch.int32, torch.int64) and t.dim() == 1:
                t = t.sort().values
            sorted_indices.append(t)
        return cls(
            indices=sorted_indices,
            num_neurons=[b.num_neurons for b in blocks],
            model_type=model_type_of(model),
            task=task,
            fingerprint=fingerprint,
            metadata=dict(metadata or {}),
        )

    # ------------------------------------------------------------------ indices

    @property
    def indices(self) -> tuple[torch.Tensor, ...]:
        """Copies of the kept ids, one (n_i,) int32 CPU tensor per FFN block (changing them
        changes nothing: an expert's indices are fixed when it is built)."""
        self.verify()
        return tuple(t.clone() for t in self._indices)

    @indices.setter
    def indices(self, value) -> None:
        raise AttributeError("TaskExpert.indices is read-only: build a new expert "
                             "(TaskExpert(...) or TaskExpert.from_indices(model, indices))")

    @property
    def num_neurons(self) -> list[int]:
        return list(self._num_neurons)

    @property
    def digest(self) -> str:
        """sha256 (16 hex chars) of the indices, recorded when they were validated."""
        return self._digest

    def verify(self) -> None:
        """Raise if the validated indices were changed in place since (a cheap version check:
        no tensor is read unless a version moved)."""
        if tuple(t._version for t in self._indices) == self._versions:
            return
        if _digest(self._indices) != self._digest:
            raise RuntimeError(f"{self!r}: its validated indices were modified in place; build a new expert")
        self._versions = tuple(t._version for t in self._indices)

    def stage(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """The index lists on ``device``, copied there once and cached, so that switching to
        this expert later moves no bytes at all. A staged copy changed in place since (seen by
        its version counter, without a device sync) is staged again from the validated ids."""
        self.verify()
        key = str(torch.device(device))
        entry = self._staged.get(key)
        if entry is None or tuple(t._version for t in entry[0]) != entry[1]:
            with torch.inference_mode(False):  # version-counted, also when staged under inference_mode
                staged = tuple(idx.to(device, copy=True) for idx in self._indices)
            entry = self._staged[key] = (staged, tuple(t._version for t in staged))  # one store
        return entry[0]

    @property
    def num_blocks(self) -> int:
        return len(self._indices)

    @property
    def kept(self) -> list[int]:
        return [int(i.numel()) for i in self._indices]

    @property
    def keep_ratio(self) -> float:
        """Kept neurons over all FFN neurons."""
        return sum(self.kept) / sum(self._num_neurons)

    def summary(self) -> dict:
        """What an expert is, in JSON types: task, model and method, totals of kept and FFN
        neurons, keep ratio, digest and soft-prompt length (the per-block lists are in the
        folder's config)."""
        return {"task": self.task, "model_type": self.model_type, "fingerprint": self.fingerprint,
                "method": self.metadata.get("method"), "digest": self.digest, "keep_ratio": self.keep_ratio,
                "kept": sum(self.kept), "num_neurons": sum(self.num_neurons), "blocks": self.num_blocks,
                "prompt_tokens": None if self.prompt is None else int(self.prompt.shape[0])}

    def prompt_and_head(self, on_expert: bool = True) -> tuple:
        """``(prompt, head)`` to run the task with: on the expert, its own, each falling back to the
        dense one; on the dense model (``on_expert=False``), the dense ones, falling back to its
        own. prompt: (P, H) or None; head: a state dict or None."""
        first, second = ("", "dense_") if on_expert else ("dense_", "")

        def pick(kind: str):
            own = getattr(self, first + kind)
            return own if own is not None else getattr(self, second + kind)

        return pick("prompt"), pick("head")

    def spec(self):
        """The ``TaskSpec`` this expert serves: the registered task of its name, else the spec
        it carries (``metadata["task_spec"]``); a ValueError if neither exists."""
        from doe.tasks import task_for

        return task_for(self.task, self.metadata.get("task_spec"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskExpert):
            return NotImplemented
        if self is other:
            return True
        simple = ("_digest", "_num_neurons", "model_type", "task", "fingerprint", "metadata")
        if any(getattr(self, k) != getattr(other, k) for k in simple):
            return False
        if not all(torch.equal(a, b) for a, b in zip(self._indices, other._indices)):
            return False
        for name in ("prompt", "dense_prompt"):
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None) or (a is not None and not (a.shape == b.shape and torch.equal(a, b))):
                return False
        for name in ("head", "dense_head"):
            a, b = getattr(self, name) or {}, getattr(other, name) or {}
            if set(a) != set(b) or not all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
                return False
        a, b = self.offsets or (None,) * self.num_blocks, other.offsets or (None,) * other.num_blocks
        return all((x is None) == (y is None) and (x is None or (x.shape == y.shape and torch.equal(x, y)))
                   for x, y in zip(a, b))

    def with_offsets(self, offsets: Optional[Sequence[Optional[torch.Tensor]]]) -> "TaskExpert":
        """A copy of this expert with ``offsets`` (see the class docstring; None: without)."""
        return TaskExpert(list(self._indices), list(self._num_neurons), self.model_type, self.task, self.fingerprint,
                          self.prompt, self.head, self.dense_prompt, self.dense_head, self.metadata, offsets)

    def __hash__(self) -> int:
        return hash((self._digest, self._num_neurons))

    def __repr__(self) -> str:
        return (f"TaskExpert(task={self.task!r}, model_type={self.model_type!r}, blocks={self.num_blocks}, "
                f"kept={sum(self.kept)}/{sum(self._num_neurons)} ({self.keep_ratio:.1%}))")

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``expert_config.json`` and ``expert.safetensors`` (indices, prompt, head) to a folder.

        The folder is written whole or not at all: into a temporary sibling first, then renamed
        into place (an existing folder is replaced only once the new one is complete).
        """
        from safetensors.torch import save_file

        from doe_kernels._version import __version__

        directory = Path(directory)
        # clone(): prompts and heads may share storage (a dense head reused for the expert).
        tensors = {f"indices.{i}": idx.contiguous() for i, idx in enumerate(self.indices)}
        for prefix in ("", "dense_"):
            prompt, head = getattr(self, prefix + "prompt"), getattr(self, prefix + "head")
            if prompt is not None:
                tensors[prefix + "prompt"] = prompt.detach().float().cpu().clone()
            for key, value in (head or {}).items():
                tensors[f"{prefix}head.{key}"] = value.detach().float().cpu().clone()
        for i, o in enumerate(self.offsets or ()):
            if o is not None:
                tensors[f"offset.{i}"] = o.contiguous()
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
            "digest": self.digest,
            "prompt_tokens": None if self.prompt is None else int(self.prompt.shape[0]),
            "head_keys": sorted(self.head or {}),
            "dense_head_keys": sorted(self.dense_head or {}),
            "offset_blocks": [i for i, o in enumerate(self.offsets or ()) if o is not None],
            "metadata": self.metadata,
        }
        text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        with atomic_folder(directory) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "doe-expert"})
            (tmp / CONFIG_NAME).write_text(text)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TaskExpert":
        """Load and validate an expert folder written by ``save_pretrained``.

        The task spec the folder carries (``metadata["task_spec"]``, as ``find_expert`` writes
        it) is checked here and used by :meth:`spec`; nothing is registered globally."""
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
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
        offset_blocks = config.get("offset_blocks") or []
        if not isinstance(offset_blocks, list) or any(not isinstance(i, int) or not 0 <= i < len(num_neurons)
                                                      for i in offset_blocks):
            raise ValueError(f"{config_path}: 'offset_blocks' must list FFN block numbers, got {offset_blocks!r}")
        missing = [f"offset.{i}" for i in offset_blocks if f"offset.{i}" not in tensors]
        if missing:
            raise ValueError(f"{weights_path}: missing {missing} for the blocks in 'offset_blocks'")
        offsets = ([tensors.get(f"offset.{i}") if i in offset_blocks else None for i in range(len(num_neurons))]
                   if offset_blocks else None)
        for key in ("task", "model_type", "fingerprint"):
            if not isinstance(config.get(key), (str, type(None))):
                raise ValueError(f"{config_path}: {key!r} must be a string or null, got {config.get(key)!r}")
        if not isinstance(config.get("metadata"), (dict, type(None))):
            raise ValueError(f"{config_path}: 'metadata' must be an object, got {config.get('metadata')!r}")
        try:
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
                metadata=config.get("metadata"),
                offsets=offsets,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{directory}: not a valid expert ({exc})") from exc
        if expert.kept != config.get("kept"):
            raise ValueError(f"{directory}: kept counts {expert.kept} disagree with the config's {config.get('kept')}")
        stored = expert.metadata.get("task_spec")
        if stored is not None:
            from doe.tasks import spec_from_dict

            try:  # checked now, used by spec(); loading registers nothing
                carried = spec_from_dict(stored)
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"{config_path}: metadata.task_spec is not a valid task spec ({exc})") from exc
            if expert.task is not None and carried.name != expert.task:
                raise ValueError(f"{config_path}: metadata.task_spec is named {carried.name!r}, the expert's task "
                                 f"is {expert.task!r}")
        return expert
