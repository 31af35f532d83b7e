"""Linear probes of the states a task head reads: fitting a head as a logistic regression
(``probe_head``) and choosing the layer it reads by cross-validation (``choose_readout_layer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from doe.backbone import head_pooling, layer_modules, layer_states, prompted_inputs, read_states
from doe.models import eval_mode
from doe.tasks import Example

if TYPE_CHECKING:
    from doe.prompt import TaskModel

__all__ = ["choose_readout_layer", "fit_logistic", "probe_head"]


class _Capture(nn.Module):
    """Stands in for a head: keeps the states it is given, answers zeros."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight, self.pooling, self.seen = head.weight, getattr(head, "pooling", None), []
        self.layer, self.layers = getattr(head, "layer", None), getattr(head, "layers", None)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        self.seen.append(states.detach().float())
        return states.new_zeros(states.shape[0], 1)


@torch.no_grad()
def probe_head(task_model: TaskModel, examples: Sequence[Example], batch_size: int = 16, l2: float = 1e-2) -> None:
    """Set ``task_model``'s head to a multinomial logistic regression of its labels on the
    states the head reads (with the current prompt), fitted by L-BFGS on standardized states
    with an L2 penalty ``l2``; the standardization is folded into the head's weights."""
    head = task_model.head
    capture = _Capture(head)
    task_model.head = capture
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i: i + batch_size]
            task_model(**task_model.encode(batch))
    finally:
        task_model.head = head
    x = torch.cat(capture.seen)  # (N, n * H): the n layers it reads, side by side
    y = torch.tensor([e.label for e in examples], device=x.device)
    weight, bias = fit_logistic(x, y, task_model.num_labels, l2)
    head.weight.copy_(weight.to(head.weight.dtype))
    head.bias.copy_(bias.to(head.bias.dtype))
    task_model.fresh_head = False


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float = 1e-2,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of y (N,) on x (N, H) by L-BFGS on standardized x with an
    L2 penalty; the standardization folded in: returns weight (C, H) and bias (C,) for raw x."""
    x = x.float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_labels, device=x.device, requires_grad=True)
    b = torch.zeros(num_labels, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return (w / sd[:, None]).t(), b - (mu / sd) @ w


@torch.no_grad()
def choose_readout_layer(task_model: TaskModel, examples: Sequence[Example], batch_size: int = 16, folds: int = 5,
                         tolerance: float = 0.01, l2: float = 1e-2) -> tuple[Optional[int], dict]:
    """The layer ``task_model``'s head should read: for every layer, the k-fold cross-validated
    accuracy of a logistic-regression probe of the states the head would read there (with the
    current prompt); the shallowest layer within ``tolerance`` of the best (shallower runs fewer
    layers). One forward over ``examples``.

    Returns:
        (layer, accuracies): the layer (None when it is the last hidden states) and each
        candidate's accuracy (keys 1..L-1 and None).
    """
    if task_model.head is None:
        raise ValueError("choose_readout_layer: only a head reads an earlier layer; this task model reads "
                         f"its {task_model.readout} output")
    examples = list(examples)
    folds = min(folds, len(examples))
    if folds < 2:
        raise ValueError(f"choose_readout_layer: expected at least 2 examples to cross-validate, got {len(examples)}")
    candidates = list(range(1, len(layer_modules(task_model.model)))) + [None]
    pooling = head_pooling(task_model.kind, task_model.head)
    feats: dict = {k: [] for k in candidates}
    with eval_mode(task_model):
        for i in range(0, len(examples), batch_size):
            enc = task_model.encode(examples[i: i + batch_size])
            b = enc["input_ids"].shape[0]
            inputs = prompted_inputs(task_model.model, [task_model.prompt] * b, enc["input_ids"], enc["attention_mask"])
            hidden = layer_states(task_model.model, inputs, candidates)
            for k in candidates:
                feats[k].append(read_states(hidden[k], inputs, list(range(b)), pooling).float().cpu())
    y = torch.tensor([e.label for e in examples])
    fold_of = torch.arange(len(examples)) % folds
    fold_of = fold_of[torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))]
    accuracy = {}
    for k in candidates:
        x = torch.cat(feats[k])
        right = 0
        for f in range(folds):
            test = fold_of == f
            weight, bias = fit_logistic(x[~test], y[~test], task_model.num_labels, l2, max_iter=100)
            right += int(((x[test] @ weight.t() + bias).argmax(-1) == y[test]).sum())
        accuracy[k] = right / len(examples)
    best = max(accuracy.values())
    return next(k for k in candidates if accuracy[k] >= best - tolerance), accuracy
