"""Rows of different tasks in one forward: each row with its own soft prompt and head.

    doe.unplug_(model, {"a": expert_a, "b": expert_b})        # both experts resident
    with doe.mixed_batch(model, ["a", "b", None]):            # FFN neurons per row
        logits = mixed_classify([tm_a, tm_b, tm_dense], examples)

``doe.mixed_batch`` (in ``doe.unplug``) decides which FFN neurons each row runs; each row reads
``[prompt_r; text_r]`` from its own ``TaskModel`` (the expert's prompt and head, or the dense
fallback's) and is read out by that TaskModel's head or verbalizer tokens, through
``doe.backbone`` (prompts of different lengths: padding after each row, masked). A fixed prompt
length per model would avoid the padding but force every expert of a model to be tuned with one
prompt length; padding costs only the difference between the longest and the shortest row.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from doe.backbone import classify, prompted_inputs
from doe.prompt import TaskModel
from doe.tasks import Example

__all__ = ["mixed_inputs", "mixed_classify"]


def _check(task_models: Sequence[TaskModel], examples: Sequence[Example]) -> None:
    if len(task_models) != len(examples):
        raise ValueError(f"expected one TaskModel per example, got {len(task_models)} for {len(examples)} examples")
    if not task_models:
        raise ValueError("expected at least one row, got none")
    model = task_models[0].model
    for i, tm in enumerate(task_models):
        if not isinstance(tm, TaskModel):
            raise TypeError(f"row {i}: expected a doe.TaskModel, got {type(tm).__name__}")
        if tm.model is not model:
            raise ValueError(f"row {i}: its TaskModel wraps another backbone; one forward needs one model")


def _by_task_model(task_models: Sequence[TaskModel]) -> list[tuple[TaskModel, list[int]]]:
    """(TaskModel, its rows) in order of first appearance."""
    out: dict[int, tuple[TaskModel, list[int]]] = {}
    for i, tm in enumerate(task_models):
        out.setdefault(id(tm), (tm, []))[1].append(i)
    return list(out.values())


def mixed_inputs(task_models: Sequence[TaskModel], examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """The backbone inputs of a mixed batch (``doe.backbone.prompted_inputs``): row r is
    ``[task_models[r].prompt; its text]``, then padding. Each TaskModel tokenizes its own rows
    (its tokenizer, its max_length)."""
    _check(task_models, examples)
    encoded: list = [None] * len(examples)
    for tm, positions in _by_task_model(task_models):
        enc = tm.encode([examples[i] for i in positions])
        for j, i in enumerate(positions):
            encoded[i] = (enc["input_ids"][j], enc["attention_mask"][j])
    width = max(ids.shape[0] for ids, _ in encoded)
    ids = torch.stack([F.pad(i, (0, width - i.shape[0])) for i, _ in encoded])
    mask = torch.stack([F.pad(m, (0, width - m.shape[0])) for _, m in encoded])
    return prompted_inputs(task_models[0].model, [tm.prompt for tm in task_models], ids, mask)


def mixed_classify(task_models: Sequence[TaskModel], examples: Sequence[Example]) -> list[torch.Tensor]:
    """One backbone forward over rows of different tasks; per row r, ``task_models[r]``'s class
    logits (fp32, (num_labels_r,)), as ``task_models[r](**task_models[r].encode([examples[r]]))[0]``
    gives them alone.

    Which FFN neurons each row runs is set around the call (``doe.mixed_batch``); the caller
    picks each row's TaskModel to match (the expert's prompt and head for an expert row, the
    dense ones for a dense row).
    """
    inputs = mixed_inputs(task_models, examples)
    if task_models[0].head is not None:
        return classify(task_models[0].model, inputs, heads=[tm.head for tm in task_models])
    return classify(task_models[0].model, inputs, label_ids=[tm.label_token_ids for tm in task_models])
