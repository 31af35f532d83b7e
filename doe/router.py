"""Identify a request's task from its text: nearest task centroid of the dense model's
mean-pooled representations, with a confidence that the runtime compares to a threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from doe.prompt import eval_mode, model_kind

__all__ = ["TaskRouter", "embed_texts"]

_CONFIG = "router_config.json"
_WEIGHTS = "router.safetensors"


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                max_length: int = 64) -> torch.Tensor:
    """(N, hidden) fp32 mean-pooled last hidden states of the dense model (no prompt)."""
    device = next(model.parameters()).device
    kind = model_kind(model)
    out = []
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            if kind == "seq2seq":
                hidden = model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
            elif kind == "encoder":
                hidden = getattr(model, "base_model", model)(**enc)[0]
            else:
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


class TaskRouter:
    """Nearest-centroid task classifier on dense representations.

    centroids: (num_tasks, hidden), L2-normalised; temperature scales the cosine similarities
    before the softmax that gives the confidence.
    """

    def __init__(self, tasks: Sequence[str], centroids: torch.Tensor, temperature: float = 0.05,
                 *, normalized: bool = False):
        if len(tasks) != centroids.shape[0] or len(tasks) < 1:
            raise ValueError(f"router: {len(tasks)} task names for {centroids.shape[0]} centroids")
        if temperature <= 0:
            raise ValueError(f"router temperature: expected > 0, got {temperature}")
        self.tasks = list(tasks)
        self.centroids = centroids.float() if normalized else F.normalize(centroids.float(), dim=-1)
        self.temperature = float(temperature)

    @classmethod
    def fit(cls, model: nn.Module, tokenizer, texts_by_task: Mapping[str, Sequence[str]],
            temperature: float = 0.05) -> "TaskRouter":
        empty = [t for t, texts in texts_by_task.items() if not texts]
        if empty or not texts_by_task:
            raise ValueError(f"router: every task needs example texts; none for {empty or 'any task'}")
        cents = [F.normalize(embed_texts(model, tokenizer, list(texts)), dim=-1).mean(0)
                 for texts in texts_by_task.values()]
        return cls(list(texts_by_task), torch.stack(cents), temperature)

    def route_embeddings(self, emb: torch.Tensor) -> tuple[list[str], list[float]]:
        probs = torch.softmax(F.normalize(emb.float(), dim=-1) @ self.centroids.t() / self.temperature, dim=-1)
        conf, idx = probs.max(-1)
        return [self.tasks[i] for i in idx.tolist()], conf.tolist()

    def route(self, model: nn.Module, tokenizer, texts: Sequence[str]) -> tuple[list[str], list[float]]:
        """(task per text, confidence in [1/num_tasks, 1])."""
        return self.route_embeddings(embed_texts(model, tokenizer, texts))

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": self.centroids.contiguous()}, str(directory / _WEIGHTS))
        (directory / _CONFIG).write_text(json.dumps({"tasks": self.tasks, "temperature": self.temperature}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TaskRouter":
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / _CONFIG).read_text())
            centroids = load_file(str(directory / _WEIGHTS))["centroids"]
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"not a router folder: {exc.filename} is missing") from exc
        except Exception as exc:
            raise ValueError(f"{directory}: corrupted router files ({type(exc).__name__}: {exc})") from exc
        return cls(config["tasks"], centroids, config.get("temperature", 0.05), normalized=True)

    def accuracy(self, model: nn.Module, tokenizer, texts_by_task: Mapping[str, Sequence[str]]) -> float:
        """Fraction of held-out texts routed to their own task."""
        right = total = 0
        for task, texts in texts_by_task.items():
            routed, _ = self.route(model, tokenizer, list(texts))
            right += sum(r == task for r in routed)
            total += len(routed)
        return right / max(total, 1)

    def __repr__(self) -> str:
        return f"TaskRouter(tasks={self.tasks}, temperature={self.temperature})"

