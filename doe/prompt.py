"""Prompt tuning on a frozen model: soft prompt tokens (and, for encoders, a small head).

``TaskModel`` turns any supported backbone into a task classifier without touching its weights:

- encoders (BERT, RoBERTa, DistilBERT, the packaged MiniLM): [prompt; text] -> last hidden
  state -> mean over text tokens -> a small linear head;
- decoder LMs (GPT-2, OPT, LLaMA, Mistral, Qwen2, Gemma): [prompt; text] -> next-token logits at
  the last text token, read at one verbalizer token per label;
- T5: [prompt; text] into the encoder, the first decoder step's logits at the verbalizer tokens.

Only the prompt (and head) train; ``prompt_tune`` checks that the backbone is bit-identical.
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
from doe.backbone import classify, prompted_inputs
from doe.models import eval_mode, frozen, model_kind
from doe.tasks import Example, TaskData, TaskSpec

__all__ = ["PromptTuningConfig", "TaskModel", "prompt_tune"]


@dataclass
class PromptTuningConfig:
    """Hyper-parameters of prompt tuning; validated on construction."""

    num_tokens: int = 8
    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-2
    head_lr: float = 5e-2
    max_length: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("num_tokens", "epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PromptTuningConfig.{name}: expected a positive int, got {value!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"PromptTuningConfig.{name}: expected a positive learning rate, got {value!r}")
        if self.weight_decay < 0:
            raise ValueError(f"PromptTuningConfig.weight_decay: expected >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return asdict(self)


class TaskModel(nn.Module):
    """A frozen backbone + soft prompt (+ head) that maps examples of one task to class logits.

    forward(input_ids (B, T), attention_mask (B, T)) -> (B, num_labels) logits.
    """

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
    ):
        super().__init__()
        self.kind = model_kind(model)
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = max_length
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
        if self.kind == "encoder":
            self.head = nn.Linear(hidden, len(spec.labels))
            if head is not None:
                self.head.load_state_dict({k: v.float() for k, v in head.items()})
            else:
                with torch.no_grad():
                    self.head.weight.normal_(0.0, hidden**-0.5, generator=g)
                    self.head.bias.zero_()
            self.head.to(embed.weight.device)
        else:
            self.label_token_ids = self._verbalizer_ids().to(embed.weight.device)

    def _verbalizer_ids(self) -> torch.Tensor:
        words = self.spec.label_words
        ids = []
        for word in words:
            pieces = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
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
        return None if self.head is None else {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}

    def encode(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Tokenize a batch (right padding) on the model's device."""
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        kwargs = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if any(p is not None for p in pairs):
            batch = self.tokenizer(texts, [p or "" for p in pairs], **kwargs)
        else:
            batch = self.tokenizer(texts, **kwargs)
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

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


def prompt_tune(task_model: TaskModel, data: TaskData | Sequence[Example], config: PromptTuningConfig, *,
                phase_name: Optional[str] = None) -> PromptTuningResult:
    """Train the soft prompt (and head) of ``task_model`` on ``data`` (its train split).
    ``phase_name`` labels the progress bar (default: ``prompt tuning <task>``).

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
    groups = [{"params": [task_model.prompt], "lr": config.lr}]
    if task_model.head is not None:
        groups.append({"params": list(task_model.head.parameters()), "lr": config.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    losses: list[float] = []
    # Dropout off: the backbone is a fixed function.
    with eval_mode(task_model.model), frozen(backbone_params):
        steps = config.epochs * math.ceil(len(examples) / config.batch_size)
        bar = progress.bar(phase_name or f"prompt tuning {task_model.spec.name}", total=steps,
                           enabled=config.show_progress)
        for _ in range(config.epochs):
            for batch in _batches(examples, config.batch_size, rng):
                labels = torch.tensor([e.label for e in batch], device=task_model.device)
                loss = F.cross_entropy(task_model(**task_model.encode(batch)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    return PromptTuningResult(task_model.prompt.detach().cpu().clone(), task_model.head_state(), losses)
