"""Architecture registry: where the FFN blocks of each model family live.

An :class:`FFNSpec` says how to recognise the FFN container modules of one family (a regex on
their fully qualified names) and where, below a container, the up / gate / down projections
are. :func:`find_ffn_blocks` walks a model and returns one :class:`FFNBlock` per container,
with the projection modules resolved and their shapes checked.

Built-in families (``config.model_type``)::

    bert, roberta      encoder.layer.N            intermediate.dense -> output.dense
    distilbert         transformer.layer.N.ffn    lin1 -> lin2
    gpt2               h.N.mlp                    c_fc -> c_proj               (Conv1D)
    opt                decoder.layers.N           fc1 -> fc2
    llama, mistral,    layers.N.mlp               act_fn(gate_proj) * up_proj -> down_proj
    qwen2, gemma
    t5                 block.N.layer.M.DenseReluDense
                         feed_forward_proj="relu"/...:    wi -> wo
                         feed_forward_proj="gated-...":   act(wi_0) * wi_1 -> dropout -> wo

Any other model: pass an ``FFNSpec`` to :func:`find_ffn_blocks`, or register one for its
``model_type`` with :func:`register_architecture`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch.nn as nn
import torch.nn.functional as F
from transformers import activations as _hf_act
from transformers.pytorch_utils import Conv1D

from doe_kernels.modules import unwrap

__all__ = [
    "FFNSpec",
    "FFNBlock",
    "SUPPORTED_MODEL_TYPES",
    "register_architecture",
    "get_ffn_specs",
    "find_ffn_blocks",
    "activation_name",
]

_PREFIX = r"(?:.*\.)?"
_PATH_PART = re.compile(r"^[A-Za-z0-9_]+$")


def _check_path(field_name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        expected = "a non-empty dotted module path or None" if optional else "a non-empty dotted module path"
        raise ValueError(f"FFNSpec.{field_name}: expected {expected}, got {value!r}")
    if not all(_PATH_PART.match(part) for part in value.split(".")):
        raise ValueError(
            f"FFNSpec.{field_name}: {value!r} is not a dotted module path "
            "(expected names like 'up_proj', 'intermediate.dense' or '0')"
        )


@dataclass(frozen=True)
class FFNSpec:
    """How to find the FFN blocks of one family.

    A module whose fully qualified name ``fqn`` satisfies
    ``re.fullmatch(r"(?:.*\\.)?" + block_pattern, fqn)`` is an FFN container; ``up``, ``down``,
    ``gate``, ``act`` and ``dropout`` are dotted paths relative to that container. ``gate`` is
    set for gated FFNs (``down(act(gate(x)) * up(x))``); ``act`` and ``dropout`` only make
    sense with it (``dropout`` is applied to ``act(gate(x)) * up(x)`` before ``down``, as in T5).
    """

    block_pattern: str
    up: str
    down: str
    gate: str | None = None
    act: str | None = None
    dropout: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_pattern, str) or not self.block_pattern:
            raise ValueError(
                f"FFNSpec.block_pattern: expected a non-empty regex string, got {self.block_pattern!r}"
            )
        try:
            re.compile(self.block_pattern)
            re.compile(_PREFIX + self.block_pattern)
        except re.error as exc:
            raise ValueError(
                f"FFNSpec.block_pattern: '{self.block_pattern}' is not a valid regular expression ({exc})"
            ) from None
        _check_path("up", self.up, optional=False)
        _check_path("down", self.down, optional=False)
        for name in ("gate", "act", "dropout"):
            _check_path(name, getattr(self, name), optional=True)
        if self.gate is None:
            extra = [n for n in ("act", "dropout") if getattr(self, n) is not None]
            if extra:
                raise ValueError(
                    f"FFNSpec.{extra[0]}={getattr(self, extra[0])!r} is only meaningful for gated FFNs, "
                    "but gate is None; set gate=... or leave act/dropout unset (for a non-gated FFN the "
                    "container's own forward applies its activation)"
                )
        paths = [p for p in (self.up, self.down, self.gate) if p is not None]
        if len(set(paths)) != len(paths):
            raise ValueError(f"FFNSpec: up, down and gate must be different modules, got {paths}")

    @property
    def gated(self) -> bool:
        return self.gate is not None


@dataclass
class FFNBlock:
    """One FFN block found in a model, with its projections resolved.

    ``kind`` is ``"linear"`` (``nn.Linear``, weight ``(out, in)``) or ``"conv1d"``
    (transformers ``Conv1D``, weight ``(in, out)``). ``num_neurons`` is the intermediate size,
    ``hidden_size`` the model width. For gated blocks ``activation`` is one of
    ``"silu" | "gelu" | "gelu_tanh" | "relu"`` when the activation module is recognised, else
    ``None`` (then call ``act_module``).
    """

    name: str
    container: nn.Module = field(repr=False)
    up_name: str
    down_name: str
    gate_name: str | None
    up: nn.Module = field(repr=False)
    down: nn.Module = field(repr=False)
    gate: nn.Module | None = field(repr=False)
    kind: str
    num_neurons: int
    hidden_size: int
    activation: str | None = None
    act_module: nn.Module | None = field(default=None, repr=False)
    dropout: nn.Module | None = field(default=None, repr=False)
    spec: FFNSpec | None = field(default=None, repr=False, compare=False)

    @property
    def gated(self) -> bool:
        return self.gate is not None


# --------------------------------------------------------------------------------------------
# Activation recognition
# --------------------------------------------------------------------------------------------


def _act_classes(*names: str) -> list[type]:
    return [c for c in (getattr(_hf_act, n, None) for n in names) if isinstance(c, type)]


# Exact types only: a subclass may change forward. Each entry was checked against the source of
# transformers.activations (5.x; the names missing in older versions are simply skipped):
#   GELUActivation         nn.functional.gelu or x/2 * (1 + erf(x / sqrt 2))         -> erf GELU
#   GELUTanh (= PytorchGELUTanh), NewGELUActivation, FastGELUActivation,
#   AccurateGELUActivation  x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))       -> tanh GELU
#   QuickGELU (x * sigmoid(1.702 x)) and ClippedGELU (clamped) are different functions: None.
_ACT_BY_TYPE: dict[type, str] = {nn.SiLU: "silu", nn.ReLU: "relu"}
for _cls in _act_classes("SiLUActivation", "SiLU"):
    _ACT_BY_TYPE[_cls] = "silu"
for _cls in _act_classes("GELUActivation"):
    _ACT_BY_TYPE[_cls] = "gelu"
for _cls in _act_classes(
    "GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"
):
    _ACT_BY_TYPE[_cls] = "gelu_tanh"

_ACT_BY_FUNCTION: dict[Any, str] = {F.silu: "silu", F.relu: "relu", F.gelu: "gelu"}


def activation_name(act: Any) -> str | None:
    """Canonical name (``"silu" | "gelu" | "gelu_tanh" | "relu"``) of an activation module, else None."""
    if isinstance(act, _FunctionActivation):
        act = act.fn
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if isinstance(act, nn.Module):
        return _ACT_BY_TYPE.get(type(act))
    try:
        return _ACT_BY_FUNCTION.get(act)
    except TypeError:  # unhashable
        return None


class _FunctionActivation(nn.Module):
    """Wraps a plain function stored as an attribute (``self.act = F.silu``) into a module."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_GATED_LM = FFNSpec(block_pattern=r"layers\.\d+\.mlp", up="up_proj", down="down_proj", gate="gate_proj", act="act_fn")
_BERT_LIKE = FFNSpec(block_pattern=r"encoder\.layer\.\d+", up="intermediate.dense", down="output.dense")
_T5_BLOCK = r"block\.\d+\.layer\.\d+\.DenseReluDense"
_T5_DENSE = FFNSpec(block_pattern=_T5_BLOCK, up="wi", down="wo")
_T5_GATED = FFNSpec(block_pattern=_T5_BLOCK, up="wi_1", down="wo", gate="wi_0", act="act", dropout="dropout")


def _t5_specs(config: Any) -> tuple[FFNSpec, ...]:
    gated = getattr(config, "is_gated_act", None)
    if gated is None:
        gated = str(getattr(config, "feed_forward_proj", "relu")).startswith("gated-")
    return (_T5_GATED,) if gated else (_T5_DENSE,)


_Entry = Union[tuple[FFNSpec, ...], Callable[[Any], tuple[FFNSpec, ...]]]

_REGISTRY: dict[str, _Entry] = {
    "bert": (_BERT_LIKE,),
    "roberta": (_BERT_LIKE,),
    "distilbert": (FFNSpec(block_pattern=r"transformer\.layer\.\d+\.ffn", up="lin1", down="lin2"),),
    "gpt2": (FFNSpec(block_pattern=r"h\.\d+\.mlp", up="c_fc", down="c_proj"),),
    "opt": (FFNSpec(block_pattern=r"decoder\.layers\.\d+", up="fc1", down="fc2"),),
    "llama": (_GATED_LM,),
    "mistral": (_GATED_LM,),
    "qwen2": (_GATED_LM,),
    "gemma": (_GATED_LM,),
    "t5": _t5_specs,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_REGISTRY)


def _as_specs(spec: Any) -> tuple[FFNSpec, ...]:
    if isinstance(spec, FFNSpec):
        return (spec,)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        specs = tuple(spec)
        if specs and all(isinstance(s, FFNSpec) for s in specs):
            return specs
    raise TypeError(
        f"expected an FFNSpec or a non-empty sequence of FFNSpec, got {type(spec).__name__}: {spec!r}"
    )


def register_architecture(
    model_type: str, spec: FFNSpec | Sequence[FFNSpec], *, overwrite: bool = False
) -> None:
    """Register the FFN spec(s) for ``model_type`` so that ``find_ffn_blocks(model)`` finds them."""
    global SUPPORTED_MODEL_TYPES
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type: expected a non-empty string, got {model_type!r}")
    specs = _as_specs(spec)
    if model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"model_type {model_type!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[model_type] = specs
    SUPPORTED_MODEL_TYPES = tuple(_REGISTRY)


_HOW_TO = '''\
Describe where its FFN blocks are with an FFNSpec (module names relative to one FFN block):

    from doe.architectures import FFNSpec, find_ffn_blocks, register_architecture

    spec = FFNSpec(block_pattern=r"layers\\.\\d+\\.mlp",   # regex on the block's module name
                   up="up_proj", down="down_proj",
                   gate="gate_proj", act="act_fn")      # gate/act only for gated FFNs
    blocks = find_ffn_blocks(model, spec)   # use it once, or register it for every model of this type:
    register_architecture("{model_type}", spec)'''


def get_ffn_specs(model_or_config: Any) -> tuple[FFNSpec, ...]:
    """The registered FFN spec(s) for a model or config, looked up by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(
            "Cannot look up the FFN layout: expected a transformers model or config with a model_type, got "
            f"{type(model_or_config).__name__}. For a custom module pass spec= to find_ffn_blocks.\n"
            + _HOW_TO.format(model_type="my_model")
        )
    entry = _REGISTRY.get(model_type)
    if entry is None:
        raise ValueError(
            f"Unsupported model_type {model_type!r}. Supported model types: "
            f"{', '.join(_REGISTRY)}.\n" + _HOW_TO.format(model_type=model_type)
        )
    return entry(config) if callable(entry) else entry


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _resolve(container: nn.Module, block_name: str, path: str, role: str) -> Any:
    obj: Any = container
    for i, part in enumerate(path.split(".")):
        if isinstance(obj, nn.Module) and part in obj._modules:
            obj = obj._modules[part]
        elif hasattr(obj, part) and not isinstance(getattr(obj, part), nn.Module) and i == path.count("."):
            obj = getattr(obj, part)  # e.g. a plain function stored as an attribute (act only)
        else:
            done = ".".join(path.split(".")[:i])
            children = list(obj._modules) if isinstance(obj, nn.Module) else []
            where = f"'{block_name}.{done}'" if done else f"'{block_name}'"
            raise ValueError(
                f"FFN block '{block_name}' ({type(container).__name__}): {role} path {path!r} not found: "
                f"{where} has no submodule {part!r}; its submodules are {children}"
            )
    if obj is None:
        raise ValueError(f"FFN block '{block_name}': {role} path {path!r} is None")
    return obj


def _projection(container: nn.Module, block_name: str, path: str, role: str) -> tuple[nn.Module, str, int, int]:
    """Resolve a projection; return (module, kind, in_features, out_features)."""
    module = unwrap(_resolve(container, block_name, path, role))
    fqn = f"{block_name}.{path}" if block_name else path
    if isinstance(module, Conv1D):
        kind = "conv1d"
    elif isinstance(module, nn.Linear):
        kind = "linear"
    else:
        raise TypeError(
            f"FFN block '{block_name}': {role} projection '{fqn}' is a {type(module).__name__}; "
            "expected torch.nn.Linear or transformers.pytorch_utils.Conv1D"
        )
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        desc = "missing" if weight is None else f"{tuple(weight.shape)} {weight.dtype}"
        raise TypeError(
            f"FFN block '{block_name}': {role} projection '{fqn}' ({type(module).__name__}) has weight "
            f"{desc}; expected a 2-D floating-point weight (quantized layers are not supported)"
        )
    rows, cols = weight.shape
    in_f, out_f = (cols, rows) if kind == "linear" else (rows, cols)
    return module, kind, int(in_f), int(out_f)


def _build_block(name: str, container: nn.Module, spec: FFNSpec) -> FFNBlock:
    up, up_kind, hidden, inter = _projection(container, name, spec.up, "up")
    down, down_kind, down_in, down_out = _projection(container, name, spec.down, "down")
    gate = None
    kinds = {spec.up: up_kind, spec.down: down_kind}
    if spec.gate is not None:
        gate, gate_kind, gate_in, gate_out = _projection(container, name, spec.gate, "gate")
        kinds[spec.gate] = gate_kind
        if (gate_in, gate_out) != (hidden, inter):
            raise ValueError(
                f"FFN block '{name}': gate projection {spec.gate!r} maps {gate_in} -> {gate_out} features "
                f"but up projection {spec.up!r} maps {hidden} -> {inter}; expected the same shape"
            )
    if len(set(kinds.values())) != 1:
        raise TypeError(
            f"FFN block '{name}': projections mix module kinds {kinds}; expected all nn.Linear or all Conv1D"
        )
    if down_in != inter:
        raise ValueError(
            f"FFN block '{name}': down projection {spec.down!r} takes {down_in} input features but up "
            f"projection {spec.up!r} produces {inter} neurons; expected down in == up out"
        )
    if down_out != hidden:
        raise ValueError(
            f"FFN block '{name}': down projection {spec.down!r} produces {down_out} features but up "
            f"projection {spec.up!r} takes {hidden}; expected the same hidden size"
        )

    activation = act_module = dropout = None
    if spec.gate is not None:
        if spec.act is not None:
            act = _resolve(container, name, spec.act, "act")
            if not isinstance(act, nn.Module):
                if not callable(act):
                    raise TypeError(
                        f"FFN block '{name}': act path {spec.act!r} is a {type(act).__name__}; "
                        "expected an activation module or function"
                    )
                act = _FunctionActivation(act)
            act_module = act
            activation = activation_name(act)
        if spec.dropout is not None:
            dropout = _resolve(container, name, spec.dropout, "dropout")
            if not isinstance(dropout, nn.Module):
                raise TypeError(
                    f"FFN block '{name}': dropout path {spec.dropout!r} is a {type(dropout).__name__}; "
                    "expected an nn.Module"
                )

    return FFNBlock(
        name=name,
        container=container,
        up_name=spec.up,
        down_name=spec.down,
        gate_name=spec.gate,
        up=up,
        down=down,
        gate=gate,
        kind=up_kind,
        num_neurons=inter,
        hidden_size=hidden,
        activation=activation,
        act_module=act_module,
        dropout=dropout,
        spec=spec,
    )


def find_ffn_blocks(
    model: nn.Module, spec: FFNSpec | Sequence[FFNSpec] | None = None
) -> list[FFNBlock]:
    """All FFN blocks of ``model`` in ``named_modules()`` order.

    Sees through gathered wrappers: on an unplugged model it finds the original modules.

    ``spec=None`` looks the spec up by ``model.config.model_type``. With several specs, the first
    one whose pattern matches a module wins. Raises ``ValueError`` when nothing matches, a path is
    missing or shapes disagree, and ``TypeError`` for projections that are not Linear / Conv1D.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_ffn_blocks: expected an nn.Module, got {type(model).__name__}")
    specs = get_ffn_specs(model) if spec is None else _as_specs(spec)
    compiled = [(s, re.compile(_PREFIX + s.block_pattern)) for s in specs]

    blocks: list[FFNBlock] = []
    seen: list[str] = []
    for name, module in model.named_modules():
        seen.append(name)
        for s, regex in compiled:
            if regex.fullmatch(name):
                for prev in blocks:
                    if prev.name == "" or name.startswith(prev.name + "."):
                        raise ValueError(
                            f"FFN block pattern '{s.block_pattern}' matched '{name}', which is inside the "
                            f"block '{prev.name}' matched before; make block_pattern more specific"
                        )
                blocks.append(_build_block(name, unwrap(module), s))
                break

    if not blocks:
        patterns = " or ".join(f"'{_PREFIX}{s.block_pattern}'" for s in specs)
        sample = [n for n in seen if n][:12]
        more = f" ... ({len(seen) - 1} in all)" if len(seen) - 1 > len(sample) else ""
        raise ValueError(
            f"No FFN block found in {type(model).__name__}: no module name fully matches "
            f"{patterns}. Module names seen: {sample}{more}"
        )
    return blocks
