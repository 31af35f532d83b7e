"""Generation tasks: a soft prompt tuned so that a frozen decoder LM continues a task's prompts
with their completions.

``TaskModel(model, tokenizer, spec)`` of a generation task (``spec.task_type == "generation"``)
is a ``GenerativeTaskModel``. A row is laid out as

    [soft prompt; before + prompt + after; completion + eos]

where ``before``/``after`` are the chat template's user turn around the task's instruction and
prompt, and the assistant turn's opening (``doe.prompt.chat_pieces``); without a template, the
instruction is a first paragraph and the completion follows the prompt's tokens directly. Only
the completion tokens are scored: training minimises their mean negative log-likelihood under
teacher forcing, attribution differentiates their summed log-likelihood, evaluation reports
their per-token NLL, and ``doe.generation.generate`` continues ``prompt_ids`` of a new prompt.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from doe.backbone import lm_logits, prompted_inputs
from doe.prompt import TaskModel, chat_pieces
from doe.tasks import Example

__all__ = ["GenerativeTaskModel", "IGNORE"]

IGNORE = -100  # the label of a position that is not scored


class GenerativeTaskModel(TaskModel):
    """A frozen decoder LM + soft prompt for one generation task.

    forward(input_ids (B, T), attention_mask (B, T), labels (B, T)) -> (B,) fp32: each row's
    summed log-likelihood of its labelled tokens (labels ``IGNORE`` elsewhere).
    max_length cuts the prompt's tokens, max_completion the completion's (before its eos).
    """

    def __init__(self, model, tokenizer, spec, *, max_completion: int = 64, **kwargs):
        kwargs.pop("readout", None)
        kwargs.pop("head", None)
        super().__init__(model, tokenizer, spec, **kwargs)
        if self.kind != "decoder":
            raise ValueError(f"task {spec.name!r} is a generation task; it needs a decoder LM, got a {self.kind} "
                             f"model ({getattr(model.config, 'model_type', '?')})")
        self.max_completion = max_completion
        self._pieces = chat_pieces(tokenizer, spec.instruction)  # an instruct model's chat turn, with or without one
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = model.generation_config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    def prompt_ids(self, text: str) -> list[int]:
        """The tokens a prompt is laid out as, up to where the completion starts."""
        instruction = self.spec.instruction
        if self._pieces is not None:
            before, after = self._pieces
            cut = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_length)
            return before + cut["input_ids"] + after
        if instruction:
            text = f"{instruction}\n\n{text}"
        return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def completion_ids(self, text: str) -> list[int]:
        """The tokens a completion is scored on: its own, then the end-of-sequence token."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_completion]
        return ids + ([] if self.eos_token_id is None else [self.eos_token_id])

    def encode(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` (B, T), right-padded, on the model's device."""
        rows, labels = [], []
        for e in examples:
            if e.completion is None:
                raise ValueError(f"task {self.spec.name!r}: a generation example needs a completion, got {e!r}")
            prompt, completion = self.prompt_ids(e.text), self.completion_ids(e.completion)
            rows.append(prompt + completion)
            labels.append([IGNORE] * len(prompt) + completion)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def padded(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long, device=self.device)

        return {"input_ids": padded(rows, pad), "attention_mask": padded([[1] * len(r) for r in rows], 0),
                "labels": padded(labels, IGNORE)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("GenerativeTaskModel: expected labels (encode's), got none")
        b = input_ids.shape[0]
        inputs = prompted_inputs(self.model, [self.prompt] * b, input_ids, attention_mask)
        hidden = self.model.base_model(inputs_embeds=inputs["inputs_embeds"],
                                       attention_mask=inputs["attention_mask"])[0]
        # the token at text position t is predicted at position P + t - 1; only scored ones
        rows, cols = torch.nonzero(labels != IGNORE, as_tuple=True)
        where = inputs["prompt_len"].to(hidden.device)[rows] + cols - 1
        logp = torch.log_softmax(lm_logits(self.model, hidden[rows, where]).float(), dim=-1)
        token = logp.gather(1, labels[rows, cols][:, None])[:, 0]
        return torch.zeros(b, device=token.device).index_add(0, rows, token)

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        """Mean negative log-likelihood per completion token of the batch."""
        inputs = self.encode(examples)
        return -self(**inputs).sum() / (inputs["labels"] != IGNORE).sum()

    def objective(self, inputs: dict, examples: Sequence[Example], target: str = "log_prob") -> torch.Tensor:
        """The completions' summed log-likelihood (any ``target``: a completion has no logit of its own)."""
        return self(**inputs).sum()

    @torch.no_grad()
    def predict(self, examples: Sequence[Example], batch_size: int = 32) -> list[int]:
        raise ValueError(f"task {self.spec.name!r} is a generation task: it has no labels to predict; see "
                         "doe.evaluate.score_generation")
