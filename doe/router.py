"""Identify a request's task from its text: a softmax classifier over tasks on the dense
model's mean-pooled representations (L2-normalised), whose probability is the confidence the
runtime compares to a threshold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from doe import progress
from doe.backbone import pooled_text
from doe.models import eval_mode

__all__ = ["TaskRouter", "embed_texts"]

_CONFIG = "router_config.json"
_WEIGHTS = "router.safetensors"


EMBED_BATCH = 64  # texts per forward when embedding


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = EMBED_BATCH,
                max_length: int = 64, bar=None) -> torch.Tensor:
    """(N, hidden) fp32 mean-pooled last hidden states of the dense model (no prompt).

    Args:
        model, tokenizer: the dense backbone and its tokenizer.
        texts: N texts.
        batch_size, max_length: texts per forward, tokens per text.
        bar: a progress bar to advance by one per batch.
    """
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            out.append(pooled_text(model, enc["input_ids"], enc["attention_mask"]).cpu())
            if bar is not None:
                bar.update(1)
    return torch.cat(out) if out else torch.empty(0, 0)


class TaskRouter:
    """Linear task classifier on dense representations.

    weight: (num_tasks, hidden), bias: (num_tasks,), applied to L2-normalised mean-pooled
    embeddings; confidence = the softmax probability of the chosen task.
    """

    def __init__(self, tasks: Sequence[str], weight: torch.Tensor, bias: torch.Tensor):
        if len(tasks) != weight.shape[0] or len(tasks) != bias.shape[0] or len(tasks) < 1:
            raise ValueError(f"router: {len(tasks)} task names for weights of shape {tuple(weight.shape)} "
                             f"and bias {tuple(bias.shape)}")
        self.tasks = list(tasks)
        self.weight, self.bias = weight.float(), bias.float()

    @classmethod
    def fit(cls, model: nn.Module, tokenizer, texts_by_task: Mapping[str, Sequence[str]], *,
            steps: int = 300, lr: float = 0.5, weight_decay: float = 1e-4, seed: int = 0,
            show_progress: bool = False) -> "TaskRouter":
        """Train on each task's example texts (full-batch Adam on cached embeddings: seconds).

        Args:
            model, tokenizer: the dense backbone whose embeddings the router reads.
            texts_by_task: task name -> its example texts (every task needs some).
            steps, lr, weight_decay, seed: of the Adam fit.
            show_progress: one bar over embedding the texts and the fit steps.

        Returns:
            A TaskRouter over the tasks, in ``texts_by_task`` order.
        """
        empty = [t for t, texts in texts_by_task.items() if not texts]
        if empty or not texts_by_task:
            raise ValueError(f"router: every task needs example texts; none for {empty or 'any task'}")
        tasks = list(texts_by_task)
        batches = sum(-(-len(texts_by_task[t]) // EMBED_BATCH) for t in tasks)
        bar = progress.bar(f"fitting the router over {len(tasks)} tasks", total=batches + steps, enabled=show_progress)
        x = F.normalize(torch.cat([embed_texts(model, tokenizer, list(texts_by_task[t]), bar=bar)
                                   for t in tasks]), dim=-1)
        y = torch.cat([torch.full((len(texts_by_task[t]),), i) for i, t in enumerate(tasks)])
        g = torch.Generator().manual_seed(seed)
        weight = (torch.randn(len(tasks), x.shape[1], generator=g) * 0.01).requires_grad_()
        bias = torch.zeros(len(tasks), requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(x @ weight.t() + bias, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
        bar.close()
        return cls(tasks, weight.detach(), bias.detach())

    def route_embeddings(self, emb: torch.Tensor) -> tuple[list[str], list[float]]:
        probs = torch.softmax(F.normalize(emb.float(), dim=-1) @ self.weight.t() + self.bias, dim=-1)
        conf, idx = probs.max(-1)
        return [self.tasks[i] for i in idx.tolist()], conf.tolist()

    def route(self, model: nn.Module, tokenizer, texts: Sequence[str]) -> tuple[list[str], list[float]]:
        """(task per text, confidence in [1/num_tasks, 1])."""
        return self.route_embeddings(embed_texts(model, tokenizer, texts))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the router's config and weights into a folder (created if needed; other files
        in it stay). Both files are written to temporary names first and renamed into place
        only once both are complete, so a failed save leaves the folder as it was; the weights
        carry the task list too, so a pair from two saves is refused on load."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = {name: directory / f".{name}.tmp" for name in (_WEIGHTS, _CONFIG)}
        try:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp[_WEIGHTS]),
                      metadata={"tasks": json.dumps(self.tasks)})
            tmp[_CONFIG].write_text(json.dumps({"tasks": self.tasks, "kind": "linear"}, indent=2))
            for name, path in tmp.items():
                os.replace(path, directory / name)
        finally:
            for path in tmp.values():
                path.unlink(missing_ok=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TaskRouter":
        from safetensors import safe_open

        directory = Path(directory)
        try:
            config = json.loads((directory / _CONFIG).read_text())
            with safe_open(str(directory / _WEIGHTS), framework="pt") as f:
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
                stored = (f.metadata() or {}).get("tasks")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"not a router folder: {exc.filename} is missing") from exc
        except Exception as exc:
            raise ValueError(f"{directory}: corrupted router files ({type(exc).__name__}: {exc})") from exc
        if stored is not None and json.loads(stored) != config["tasks"]:
            raise ValueError(f"{directory}: {_WEIGHTS} was saved for tasks {json.loads(stored)}, {_CONFIG} lists "
                             f"{config['tasks']} (the files come from two saves); save the router again")
        return cls(config["tasks"], weight, bias)

    def accuracy(self, model: nn.Module, tokenizer, texts_by_task: Mapping[str, Sequence[str]]) -> float:
        """Fraction of held-out texts routed to their own task."""
        right = total = 0
        for task, texts in texts_by_task.items():
            routed, _ = self.route(model, tokenizer, list(texts))
            right += sum(r == task for r in routed)
            total += len(routed)
        return right / max(total, 1)

    def __repr__(self) -> str:
        return f"TaskRouter(tasks={self.tasks})"

