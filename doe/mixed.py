"""Rows of different tasks in one forward: each row with its own soft prompt and head.

    doe.unplug_(model, {"a": expert_a, "b": expert_b})        # both experts resident
    with doe.mixed_batch(model, ["a", "b", None]):            # FFN neurons per row
        logits = mixed_classify([tm_a, tm_b, tm_dense], examples)

``doe.mixed_batch`` (in ``doe.unplug``) decides which FFN neurons each row runs; this module
decides what each row reads and how its answer comes out: row r is ``[prompt_r; text_r]``
built from its own ``TaskModel`` (the expert's prompt and head, or the dense fallback's), and
its logits come from that TaskModel's head or verbalizer tokens.

Prompts of different lengths: every row is its prompt, then its text tokens, then padding up
to the longest row, with an attention mask over the padding. The real tokens keep the
positions they have when the row runs alone, and padding after them is invisible to them
(masked for encoders, in the future for causal decoders), so a row's result does not depend
on its neighbours. A fixed prompt length per model would avoid the padding but force every
expert of a model to be tuned with one prompt length; padding costs only the difference
between the longest and the shortest row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from doe.prompt import TaskModel, _backbone
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
    """The backbone inputs of a mixed batch: row r is ``[task_models[r].prompt; its text]``, then padding.

    Returns ``inputs_embeds`` (B, L, H), ``attention_mask`` (B, L), and per row
    ``prompt_len`` and ``text_len`` (B,) long: its text occupies positions
    [prompt_len, prompt_len + text_len). Each TaskModel tokenizes its own rows (its
    tokenizer, its max_length).
    """
    _check(task_models, examples)
    embed = task_models[0].model.get_input_embeddings()
    rows: list = [None] * len(examples)
    for tm, positions in _by_task_model(task_models):
        enc = tm.encode([examples[i] for i in positions])
        tokens = embed(enc["input_ids"])
        for j, i in enumerate(positions):
            text = tokens[j][enc["attention_mask"][j].bool()]
            rows[i] = (tm.prompt.to(tokens.dtype), text)
    lengths = [p.shape[0] + t.shape[0] for p, t in rows]
    first = rows[0][1]
    embeds = first.new_zeros(len(rows), max(lengths), first.shape[-1])
    mask = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=first.device)
    for r, ((prompt, text), n) in enumerate(zip(rows, lengths)):
        embeds[r, :n] = torch.cat([prompt, text])
        mask[r, :n] = 1
    prompt_len = torch.tensor([p.shape[0] for p, _ in rows])
    text_len = torch.tensor([t.shape[0] for _, t in rows])
    return {"inputs_embeds": embeds, "attention_mask": mask, "prompt_len": prompt_len, "text_len": text_len}


def mixed_classify(task_models: Sequence[TaskModel], examples: Sequence[Example]) -> list[torch.Tensor]:
    """One backbone forward over rows of different tasks; per row r, ``task_models[r]``'s class
    logits (fp32, (num_labels_r,)), as ``task_models[r](**task_models[r].encode([examples[r]]))[0]``
    gives them alone.

    Which FFN neurons each row runs is set around the call (``doe.mixed_batch``); the caller
    picks each row's TaskModel to match (the expert's prompt and head for an expert row, the
    dense ones for a dense row).
    """
    inputs = mixed_inputs(task_models, examples)
    tm0 = task_models[0]
    embeds, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    start, length = inputs["prompt_len"].tolist(), inputs["text_len"].tolist()
    out: list = [None] * len(examples)
    if tm0.kind == "encoder":
        hidden = _backbone(tm0.model, "encoder")(inputs_embeds=embeds, attention_mask=mask)[0]
        for tm, positions in _by_task_model(task_models):
            pooled = torch.stack([hidden[r, start[r]:start[r] + length[r]].float().sum(0) / max(length[r], 1)
                                  for r in positions])
            for r, logits in zip(positions, tm.head(pooled)):
                out[r] = logits
        return out
    if tm0.kind == "seq2seq":
        begin = tm0.model.config.decoder_start_token_id or 0
        dec = torch.full((len(examples), 1), begin, dtype=torch.long, device=embeds.device)
        logits = tm0.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits[:, 0]
    else:
        full = tm0.model(inputs_embeds=embeds, attention_mask=mask).logits
        last = torch.tensor([s + n - 1 for s, n in zip(start, length)], device=full.device)
        logits = full[torch.arange(len(examples), device=full.device), last]
    for r, tm in enumerate(task_models):
        out[r] = logits[r, tm.label_token_ids].float()
    return out
