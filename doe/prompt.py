"""Prompt tuning on a frozen model: soft prompt tokens (and, for encoders, a small head).

``TaskModel`` turns any supported backbone into a task classifier without touching its weights:

- encoders (BERT, RoBERTa, DistilBERT, the packaged MiniLM): [prompt; text] -> last hidden
  state -> mean over text tokens -> a small linear head;
- decoder LMs (GPT-2, OPT, LLaMA, Mistral, Qwen2, Gemma): [prompt; text] -> the mean of the
  text's hidden states -> a small linear head (``readout="mean"``, the default), or the last
  text token's hidden state -> a head (``readout="head"``, as LlamaForSequenceClassification),
  or the next-token logits at the last text token at one verbalizer token per label
  (``readout="verbalizer"``);
- T5: [prompt; text] into the encoder, the first decoder step's logits at the verbalizer tokens.

A head may read an earlier layer's states (``readout_layer``: k = after k layers): on a decoder,
mid-layer states often classify better than the last ones, and the forward then stops there.
``readout_layer="auto"`` picks the layer whose probe cross-validates best on the training texts.
A head may also read several layers' states side by side (``readout_layers``); a probed head
reads the first layer's next to the one chosen (``PromptTuningConfig.readout_first``).

A task's ``instruction`` goes before the text: inside the user turn of the tokenizer's chat
template where it has one (the text then ends where the assistant's answer would start), else
as a first paragraph. Only the prompt (and head) train; the backbone stays bit-identical.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from doe import progress
from doe.backbone import classify, head_layers, layer_modules, prompted_inputs
from doe.models import eval_mode, frozen, model_kind
from doe.probe import choose_readout_layer, probe_head
from doe.tasks import Example, TaskData, TaskSpec

__all__ = ["PromptTuningConfig", "READOUTS", "TaskModel", "chat_pieces", "probes_head", "prompt_tune"]

READOUTS = ("head", "mean", "verbalizer")
_MEAN_MARK = "pooling_mean"  # a head state's key that says the head reads the mean of the text
_LAYER_MARK = "readout_layer"  # a head state's key: the deepest layer the head reads, (1,) float
#: a head state's key: the layers a head reading several reads, in order, (n,) float (0: the last
#: hidden states)
_LAYERS_MARK = "readout_layers"


@dataclass
class PromptTuningConfig:
    """Hyper-parameters of prompt tuning; validated on construction."""

    num_tokens: int = 8
    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-2
    head_lr: float = 5e-2
    #: the head's learning rate when it started as a probe (head_init): small, so tuning refines
    #: the fitted head instead of unlearning it (on SmolLM2 / Reuters R8, 5e-2 took a probe at 89%
    #: down to 80%, 1e-3 kept 89%)
    probe_head_lr: float = 1e-3
    max_length: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    show_progress: bool = True
    readout: str = "auto"  # "head", "mean", "verbalizer", or the model kind's default (TaskModel)
    #: a new head starts as a logistic-regression probe of the states it reads ("probe": fitted on
    #: the training texts before tuning, as in linear-probing-then-fine-tuning) or at random
    #: ("random"); "auto": a probe on decoders, random on encoders
    head_init: str = "auto"
    #: the layer a new head reads (k: the states after k layers), None for the last hidden states,
    #: or "auto": on a head that starts as a probe, the shallowest layer whose probe
    #: cross-validates within ``layer_tolerance`` of the best one (``choose_readout_layer``)
    readout_layer: Optional[int | str] = "auto"
    layer_tolerance: float = 0.01
    #: a new head reading a layer k > 1 also reads the first layer's states, side by side (the
    #: head is (C, 2H)): True, False, or "auto" (on a head that starts as a probe). On SmolLM2 /
    #: Reuters R8 the first layer's mean probed at 93.5% held-out and the chosen 8th at 89.5-90.5%,
    #: both together at 93.5-94%, while training-split cross-validation ranked the 8th first
    readout_first: bool | str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_tokens", "epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PromptTuningConfig.{name}: expected a positive int, got {value!r}")
        for name in ("lr", "head_lr", "probe_head_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"PromptTuningConfig.{name}: expected a positive learning rate, got {value!r}")
        if self.weight_decay < 0:
            raise ValueError(f"PromptTuningConfig.weight_decay: expected >= 0, got {self.weight_decay}")
        if self.head_init not in ("auto", "probe", "random"):
            raise ValueError(f"PromptTuningConfig.head_init: expected auto, probe or random, got {self.head_init!r}")
        layer = self.readout_layer
        if not (layer is None or layer == "auto" or (isinstance(layer, int) and not isinstance(layer, bool)
                                                      and layer >= 1)):
            raise ValueError(f"PromptTuningConfig.readout_layer: expected a layer number >= 1, None or 'auto', "
                             f"got {layer!r}")
        if self.readout_first not in (True, False, "auto"):
            raise ValueError(f"PromptTuningConfig.readout_first: expected True, False or 'auto', got "
                             f"{self.readout_first!r}")
        if not 0 <= self.layer_tolerance < 1:
            raise ValueError(f"PromptTuningConfig.layer_tolerance: expected a fraction in [0, 1), got "
                             f"{self.layer_tolerance!r}")
        if self.readout not in ("auto",) + READOUTS:
            raise ValueError(f"PromptTuningConfig.readout: expected one of auto, {', '.join(READOUTS)}, "
                             f"got {self.readout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def chat_pieces(tokenizer, instruction: str) -> Optional[tuple[list[int], list[int]]]:
    """The token ids that go before and after a text to put it in the user turn of
    ``tokenizer``'s chat template after ``instruction`` (the assistant's turn opened after it);
    None for a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\x00"
    turn = [{"role": "user", "content": f"{instruction}\n\n{mark}" if instruction else mark}]
    before, after = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True).split(mark)
    pieces = [tokenizer(part, add_special_tokens=False)["input_ids"] if part else [] for part in (before, after)]
    return pieces[0], pieces[1]


def _readout(kind: str, readout: Optional[str], prompt, head) -> str:
    if readout in (None, "auto"):
        if head is not None and _MEAN_MARK in head and kind == "decoder":
            return "mean"
        if head is not None or kind == "encoder":
            return "head"
        # a fresh decoder gets a head on the mean of the text's states (on SmolLM2 / Reuters R8 its
        # probes cross-validated at 91.5% against 78.5% on the last token's); one given a prompt
        # alone was tuned with verbalizers
        return "mean" if prompt is None and kind == "decoder" else "verbalizer"
    if readout not in READOUTS:
        raise ValueError(f"readout: expected one of auto, {', '.join(READOUTS)}, got {readout!r}")
    if kind == "encoder" and readout == "mean":
        return "head"  # an encoder's head reads the mean already
    if (kind, readout) in (("encoder", "verbalizer"), ("seq2seq", "head"), ("seq2seq", "mean")):
        raise ValueError(f"readout {readout!r} does not apply to {kind} models: encoders read through a head, "
                         "seq2seq models at verbalizer tokens")
    if readout == "verbalizer" and head is not None:
        raise ValueError("readout 'verbalizer' was given with a head; pass one or the other")
    return readout


class TaskModel(nn.Module):
    """A frozen backbone + soft prompt (+ head) that maps examples of one task to class logits.

    forward(input_ids (B, T), attention_mask (B, T)) -> (B, num_labels) logits.
    readout: "head" or "verbalizer" (see the module docstring); None: a head where one is given,
    else the model kind's default for a new prompt (a head, verbalizers for seq2seq), and
    verbalizers for a decoder given a prompt without a head (how it was tuned).
    readout_layer: the layer a head reads (k: after k layers; None: the last hidden states);
    readout_layers: several layers, whose states the head reads side by side (a head over n
    layers is (C, n * H)); a given head that names its layers keeps them.
    """

    def __new__(cls, model=None, tokenizer=None, spec=None, **kwargs):
        if cls is TaskModel and isinstance(spec, TaskSpec) and spec.is_generation:
            from doe.generative import GenerativeTaskModel  # a generation task's TaskModel

            cls = GenerativeTaskModel
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        spec: TaskSpec,
        *,
        num_tokens: int = 8,
        prompt: Optional[torch.Tensor] = None,
        head: Optional[dict[str, torch.Tensor]] = None,
        max_length: int = 64,
        seed: int = 0,
        readout: Optional[str] = None,
        readout_layer: Optional[int] = None,
        readout_layers: Optional[Sequence[Optional[int]]] = None,
    ):
        super().__init__()
        self.kind = model_kind(model)
        self.readout = "generation" if spec.is_generation else _readout(self.kind, readout, prompt, head)
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
        self._pieces = chat_pieces(tokenizer, spec.instruction) if spec.instruction else None
        embed = model.get_input_embeddings()
        hidden = embed.weight.shape[1]
        g = torch.Generator().manual_seed(seed)  # prompt and head init depend on ``seed`` only
        if prompt is None:
            # Initialise from embeddings of random vocabulary tokens (Lester et al., 2021).
            ids = torch.randint(0, embed.weight.shape[0], (num_tokens,), generator=g)
            prompt = embed.weight.detach()[ids.to(embed.weight.device)].float().clone()
        elif prompt.dim() != 2 or prompt.shape[1] != hidden:
            raise ValueError(f"prompt: expected shape (n_tokens, {hidden}), got {tuple(prompt.shape)}")
        self.prompt = nn.Parameter(prompt.detach().float().clone().to(embed.weight.device))
        self.head: Optional[nn.Linear] = None
        self.register_buffer("label_token_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.fresh_head = head is None  # prompt_tune may start it as a probe (PromptTuningConfig.head_init)
        self._hidden, self._seed = hidden, seed
        layers = (readout_layer,) if readout_layers is None else tuple(readout_layers)
        if self.readout in ("head", "mean"):
            weights = None
            if head is not None:
                if _LAYERS_MARK in head:
                    layers = tuple(int(round(float(v))) or None for v in head[_LAYERS_MARK].flatten())
                elif _LAYER_MARK in head:
                    layers = (int(round(float(head[_LAYER_MARK].flatten()[0]))),)
                weights = {k: v.float() for k, v in head.items() if k not in (_MEAN_MARK, _LAYER_MARK, _LAYERS_MARK)}
                shape = tuple(weights["weight"].shape) if "weight" in weights else None
                if shape != (len(spec.labels), hidden * len(layers)):
                    raise ValueError(f"head: expected a weight of shape ({len(spec.labels)}, {hidden * len(layers)}) "
                                     f"({len(spec.labels)} labels, {len(layers)} layer(s) of {hidden} states), "
                                     f"got {shape}")
            self.head = self._new_head(len(layers), g)
            if weights is not None:
                self.head.load_state_dict(weights)
        elif self.readout == "verbalizer":
            self.label_token_ids = self._verbalizer_ids().to(embed.weight.device)
        self.readout_layers = layers

    def _new_head(self, num_layers: int, generator: Optional[torch.Generator] = None) -> nn.Linear:
        """A head over ``num_layers`` layers' states, at random (N(0, 1/H) weights, zero bias)."""
        head = nn.Linear(self._hidden * num_layers, len(self.spec.labels))
        if self.readout == "mean":
            head.pooling = "mean"  # read by doe.backbone.classify
        g = generator or torch.Generator().manual_seed(self._seed)
        with torch.no_grad():
            head.weight.normal_(0.0, self._hidden**-0.5, generator=g)
            head.bias.zero_()
        return head.to(self.prompt.device)

    @property
    def readout_layer(self) -> Optional[int]:
        """The deepest layer the head reads (k: after k layers), None for the last hidden states."""
        return getattr(self.head, "layer", None) if self.head is not None else None

    @readout_layer.setter
    def readout_layer(self, layer: Optional[int]) -> None:
        self.readout_layers = (layer,)

    @property
    def readout_layers(self) -> tuple:
        """The layers whose states the head reads, concatenated in this order ((None,): the last
        hidden states only)."""
        return head_layers(self.head)

    @readout_layers.setter
    def readout_layers(self, layers: Sequence[Optional[int]]) -> None:
        layers = tuple(layers)
        name = "readout_layer" if len(layers) == 1 else "readout_layers"
        if layers != (None,):
            if self.head is None:
                raise ValueError(f"{name} {layers if len(layers) > 1 else layers[0]!r}: only a head reads an earlier "
                                 f"layer; this task model reads its {self.readout} output")
            count = len(layer_modules(self.model))
            for layer in layers:
                if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                          or not 1 <= layer <= count):
                    raise ValueError(f"{name}: expected a layer in 1..{count} or None, got {layer!r}")
            if not layers or len(set(layers)) != len(layers):
                raise ValueError(f"readout_layers: expected distinct layers in 1..{count} or None, got {layers!r}")
        if self.head is None:
            return
        if self.head.in_features != self._hidden * len(layers):
            if not self.fresh_head:
                raise ValueError(f"readout_layers {layers!r}: this head was fitted on "
                                 f"{self.head.in_features // self._hidden} layer(s) of states, not {len(layers)}")
            self.head = self._new_head(len(layers))
        self.head.layers = layers
        self.head.layer = None if None in layers else max(layers)

    def _verbalizer_ids(self) -> torch.Tensor:
        words = self.spec.label_words
        ids = []
        # after a chat template's assistant turn the answer starts a line, elsewhere a word
        space = "" if self._pieces is not None else " "
        for word in words:
            pieces = self.tokenizer(space + word, add_special_tokens=False)["input_ids"]
            if not pieces:
                raise ValueError(f"verbalizer word {word!r} of task {self.spec.name!r} is empty after tokenizing")
            ids.append(pieces[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"verbalizer of task {self.spec.name!r} maps two labels to one token "
                             f"({dict(zip(words, ids))}); give distinct words with TaskSpec.verbalizer")
        return torch.tensor(ids, dtype=torch.long)

    @property
    def num_labels(self) -> int:
        return len(self.spec.labels)

    @property
    def device(self) -> torch.device:
        return self.prompt.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.prompt] + (list(self.head.parameters()) if self.head is not None else [])

    def head_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The head's weights (a "mean" head marks itself, so that it is read back the same way)."""
        if self.head is None:
            return None
        state = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        if self.readout == "mean":
            state[_MEAN_MARK] = torch.ones(1)
        if self.readout_layer is not None:
            state[_LAYER_MARK] = torch.tensor([float(self.readout_layer)])
        if len(self.readout_layers) > 1:
            state[_LAYERS_MARK] = torch.tensor([float(k or 0) for k in self.readout_layers])
        return state

    def encode(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Tokenize a batch (right padding) on the model's device; ``max_length`` cuts the text,
        not the instruction or the template around it."""
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        instruction = self.spec.instruction
        if instruction and self._pieces is None:  # no chat template: the instruction is a first paragraph
            texts = [f"{instruction}\n\n{t}" for t in texts]
        kwargs = dict(truncation=True, max_length=self.max_length)
        if self._pieces is not None:
            before, after = self._pieces
            joined = [t if p is None else f"{t}\n{p}" for t, p in zip(texts, pairs)]
            texts_ids = self.tokenizer(joined, add_special_tokens=False, **kwargs)["input_ids"]
            rows = [before + ids + after for ids in texts_ids]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
            return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if any(p is not None for p in pairs):
            batch = self.tokenizer(texts, [p or "" for p in pairs], padding=True, return_tensors="pt", **kwargs)
        else:
            batch = self.tokenizer(texts, padding=True, return_tensors="pt", **kwargs)
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device)}

    def full_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) text mask -> (B, n_prompt + T) with the prompt positions attended."""
        ones = attention_mask.new_ones(attention_mask.shape[0], self.prompt.shape[0])
        return torch.cat([ones, attention_mask], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        inputs = prompted_inputs(self.model, [self.prompt] * b, input_ids, attention_mask)
        if self.head is not None:
            return torch.stack(classify(self.model, inputs, heads=[self.head] * b))
        return torch.stack(classify(self.model, inputs, label_ids=[self.label_token_ids] * b))

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        """The training loss of a batch: cross-entropy of the gold labels."""
        labels = torch.tensor([e.label for e in examples], device=self.device)
        return F.cross_entropy(self(**self.encode(examples)), labels)

    def objective(self, inputs: dict, examples: Sequence[Example], target: str = "logit") -> torch.Tensor:
        """What attribution differentiates, summed over the batch: the gold label's logit, or its
        log-probability (``target="log_prob"``). inputs: ``encode(examples)``."""
        logits = self(**inputs)
        if target == "log_prob":
            logits = torch.log_softmax(logits.float(), dim=-1)
        labels = torch.tensor([e.label for e in examples], device=logits.device)
        return logits.gather(1, labels[:, None]).sum()

    @torch.no_grad()
    def predict(self, examples: Sequence[Example], batch_size: int = 32) -> list[int]:
        out: list[int] = []
        with eval_mode(self):
            for i in range(0, len(examples), batch_size):
                out += self(**self.encode(examples[i : i + batch_size])).argmax(-1).tolist()
        return out


@dataclass
class PromptTuningResult:
    prompt: torch.Tensor
    head: Optional[dict[str, torch.Tensor]]
    losses: list[float] = field(default_factory=list)


def _batches(examples: Sequence[Example], batch_size: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]


def probes_head(config: PromptTuningConfig, task_model: TaskModel | str) -> bool:
    """Whether ``config`` starts ``task_model``'s new head as a probe (``head_init``); given a
    model kind ("decoder", ...) instead, whether it would for a head on such a model."""
    kind = task_model if isinstance(task_model, str) else task_model.kind
    if not isinstance(task_model, str) and task_model.head is None:
        return False
    return config.head_init == "probe" or (config.head_init == "auto" and kind == "decoder")


def prompt_tune(task_model: TaskModel, data: TaskData | Sequence[Example], config: PromptTuningConfig, *,
                phase_name: Optional[str] = None, extra: Sequence[dict] = ()) -> PromptTuningResult:
    """Train the soft prompt (and head) of ``task_model`` on ``data`` (its train split).
    ``phase_name`` labels the progress bar (default: ``prompt tuning <task>``); ``extra``: more
    optimizer parameter groups trained with them (``{"params": [...], "lr": ...}``).

    The backbone's parameters are frozen for the duration (their requires_grad flags are put
    back afterwards) and must come out bit-identical. Works on an unplugged (expert) model
    too: input gradients flow through the gathered kernels.
    """
    examples = data.train if isinstance(data, TaskData) else list(data)
    if not examples:
        raise ValueError("prompt_tune: expected at least one training example, got none")
    backbone_params = list(task_model.model.parameters())
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    probed = probes_head(config, task_model) and task_model.fresh_head
    fresh = task_model.head is not None and task_model.fresh_head
    if fresh and config.readout_layer != "auto":
        task_model.readout_layer = config.readout_layer
    with eval_mode(task_model.model), frozen(backbone_params):
        if probed and config.readout_layer == "auto":
            task_model.readout_layer = choose_readout_layer(task_model, examples, config.batch_size,
                                                            tolerance=config.layer_tolerance)[0]
        if (fresh and len(task_model.readout_layers) == 1 and task_model.readout_layer != 1
                and config.readout_first in (True, "auto" if probed else True)):
            task_model.readout_layers = (1, task_model.readout_layer)
        if probed:
            probe_head(task_model, examples, config.batch_size)
    groups = [{"params": [task_model.prompt], "lr": config.lr}]
    if task_model.head is not None:
        groups.append({"params": list(task_model.head.parameters()),
                       "lr": config.probe_head_lr if probed else config.head_lr})
    optimizer = torch.optim.AdamW(groups + list(extra), weight_decay=config.weight_decay)
    losses: list[float] = []
    # Dropout off: the backbone is a fixed function.
    with eval_mode(task_model.model), frozen(backbone_params):
        steps = config.epochs * math.ceil(len(examples) / config.batch_size)
        bar = progress.bar(phase_name or f"prompt tuning {task_model.spec.name}", total=steps,
                           enabled=config.show_progress)
        for _ in range(config.epochs):
            for batch in _batches(examples, config.batch_size, rng):
                loss = task_model.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    return PromptTuningResult(task_model.prompt.detach().cpu().clone(), task_model.head_state(), losses)
