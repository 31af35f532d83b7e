"""Evaluation: the task metric and latency of the dense prompt-tuned model vs its experts
(generation tasks: per-token NLL of held-out completions, perplexity, and the exact match and
ROUGE-L of greedy generations)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from doe.attribution import reached_blocks
from doe.backbone import layer_modules
from doe.expert import TaskExpert
from doe.models import eval_mode
from doe.prompt import TaskModel
from doe.metrics import compute_metric, exact_match, rouge_l
from doe.tasks import Example, TaskData
from doe.unplug import unplugged
from doe_kernels.env import synchronize

__all__ = ["EvalRow", "EvalReport", "evaluate", "score_generation", "score_task_model"]


@dataclass
class EvalRow:
    """One model's metric and median latency per batch on the held-out split."""

    name: str
    keep_ratio: float  # kept FFN neurons over all FFN neurons in the layers the row runs
    metric: float
    latency_ms: float  # median per batch
    speedup: float = 1.0  # dense latency / this latency
    extra: dict = field(default_factory=dict)  # generation tasks: perplexity, exact_match, rouge_l
    layers: Optional[int] = None  # transformer layers the row runs (a head reading an earlier layer stops there)


@dataclass
class EvalReport:
    """The rows of one evaluation (dense first); ``to_markdown`` renders them."""

    task: str
    metric_name: str
    batch_size: int
    device: str
    rows: list[EvalRow] = field(default_factory=list)
    examples: int = 0  # held-out examples scored

    def row(self, name: str) -> EvalRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def to_markdown(self) -> str:
        lines = [f"task {self.task} · {self.examples} held-out examples · metric {self.metric_name} · "
                 f"batch {self.batch_size} · {self.device}", ""]
        if self.rows and self.rows[0].extra:  # a generation task
            lines += ["| model | layers | keep | NLL/token | perplexity | exact match | ROUGE-L | latency ms/batch | speed-up |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in self.rows:
                x = r.extra
                lines.append(f"| {r.name} | {r.layers} | {r.keep_ratio:.2f} | {r.metric:.3f} | {x['perplexity']:.2f} | "
                             f"{100 * x['exact_match']:.1f} | {100 * x['rouge_l']:.1f} | {r.latency_ms:.2f} | "
                             f"{r.speedup:.2f}x |")
            return "\n".join(lines)
        lines += [f"| model | layers | keep | {self.metric_name} | latency ms/batch | speed-up |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.layers} | {r.keep_ratio:.2f} | {100 * r.metric:.1f} | {r.latency_ms:.2f} | {r.speedup:.2f}x |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as plain JSON-serialisable data (``rows``: one dict per row, dense first)."""
        return {"task": self.task, "metric": self.metric_name, "examples": self.examples,
                "batch_size": self.batch_size, "device": self.device, "rows": [asdict(r) for r in self.rows]}


def _timed_forwards(task_model: TaskModel, examples: Sequence[Example], batch_size: int):
    """Per batch of ``examples``: (its encoded inputs, the forward's output); and the median ms
    of the forwards (after one warm-up: Triton compiles on the first call)."""
    outputs, times = [], []
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    with torch.inference_mode(), eval_mode(task_model):
        task_model(**task_model.encode(batches[0]))
        for batch in batches:
            enc = task_model.encode(batch)
            synchronize(task_model.device)
            t0 = time.perf_counter()
            out = task_model(**enc)
            synchronize(task_model.device)
            times.append(time.perf_counter() - t0)
            outputs.append((enc, out))
    return outputs, 1000 * statistics.median(times)


def score_task_model(task_model: TaskModel, examples: Sequence[Example], batch_size: int = 32) -> tuple[float, float]:
    """(metric, median ms per batch) of ``task_model`` on ``examples``."""
    outputs, ms = _timed_forwards(task_model, examples, batch_size)
    preds = [p for _, logits in outputs for p in logits.argmax(-1).tolist()]
    return compute_metric(task_model.spec.metric, preds, [e.label for e in examples]), ms


def score_generation(task_model, examples: Sequence[Example], batch_size: int = 32) -> tuple[float, float, dict]:
    """(per-token NLL of the completions, median ms per teacher-forced batch, extra) of a
    ``GenerativeTaskModel`` on ``examples``; extra: perplexity, and the mean exact match and
    ROUGE-L F1 of greedy generations (one prompt at a time, up to the longest completion)."""
    from doe.generation import GenerateParams, generate

    outputs, ms = _timed_forwards(task_model, examples, batch_size)
    total = -sum(float(logp.sum()) for _, logp in outputs)
    count = sum(int((enc["labels"] >= 0).sum()) for enc, _ in outputs)
    longest = max(len(task_model.completion_ids(e.completion)) for e in examples)
    soft = task_model.prompt.detach()
    em = rl = 0.0
    for e in examples:
        out = generate(task_model.model, task_model.tokenizer, GenerateParams(e.text, max_new_tokens=longest),
                       soft_prompt=soft if soft.shape[0] else None, prompt_ids=task_model.prompt_ids(e.text))
        em += exact_match(out.text, e.completion)
        rl += rouge_l(out.text, e.completion)
    nll = total / max(count, 1)
    extra = {"perplexity": math.exp(min(nll, 50.0)), "exact_match": em / len(examples), "rouge_l": rl / len(examples)}
    return nll, ms, extra


def evaluate(
    model: nn.Module,
    tokenizer,
    data: TaskData,
    dense: TaskModel,
    experts: Sequence[TaskExpert] = (),
    *,
    batch_size: int = 32,
    max_eval: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    zero_shot: bool = False,
) -> EvalReport:
    """Metric and latency on ``data.eval``: the dense prompt-tuned ``dense`` and each expert
    (with its own prompt and head if it carries them and is this task's, else ``dense``'s).

    Args:
        model, tokenizer: the backbone ``dense`` and the experts were made for.
        data: the task; its held-out split is scored.
        dense: the prompt-tuned TaskModel on the dense model (the baseline row).
        experts: unplugged in turn, each scored with its own (or ``dense``'s) prompt and head.
        batch_size: examples per forward; latency is the median per batch.
        max_eval: score only the first ``max_eval`` held-out examples.
        names: one row name per expert (default: ``expert@KEEP``, plus the task if another's).
        zero_shot: add a ``zero-shot`` row after dense (decoders and seq2seq models): no soft
            prompt, no head, the task's instruction and its verbalizer tokens.

    Returns:
        An EvalReport: one row for dense, then one per expert, with speed-ups over dense.
    """
    examples = data.eval[:max_eval] if max_eval else data.eval
    if not examples:
        raise ValueError(f"evaluate: task {data.spec.name!r} has no evaluation examples")
    if names is not None and len(names) != len(experts):
        raise ValueError(f"evaluate: expected one name per expert ({len(experts)}), got {len(names)}")
    generative = data.spec.is_generation
    report = EvalReport(data.spec.name, "nll" if generative else data.spec.metric, batch_size, str(dense.device),
                        examples=len(data.eval))

    def score(task_model):
        if generative:
            return score_generation(task_model, examples, batch_size)
        return (*score_task_model(task_model, examples, batch_size), {})

    total = len(layer_modules(model))

    def run(task_model, expert=None) -> tuple[int, float]:
        """(layers the row runs, kept share of their FFN neurons)."""
        depth = reached_blocks(task_model.readout_layer, total)
        if expert is None:
            return depth, 1.0
        return depth, sum(expert.kept[:depth]) / sum(expert.num_neurons[:depth])

    metric, latency, extra = score(dense)
    report.rows.append(EvalRow("dense", 1.0, metric, latency, extra=extra, layers=run(dense)[0]))
    if zero_shot and generative:
        metric, ms, extra = score(TaskModel(model, tokenizer, data.spec, prompt=dense.prompt.detach()[:0],
                                            max_length=dense.max_length))
        report.rows.append(EvalRow("zero-shot", 1.0, metric, ms, latency / ms, extra=extra, layers=total))
    elif zero_shot and dense.kind != "encoder":
        untuned = TaskModel(model, tokenizer, data.spec, prompt=dense.prompt.detach()[:0], readout="verbalizer",
                            max_length=dense.max_length)
        zs_metric, ms = score_task_model(untuned, examples, batch_size)
        report.rows.append(EvalRow("zero-shot", 1.0, zs_metric, ms, latency / ms, layers=total))
    for i, expert in enumerate(experts):
        # An expert of another task is judged with this task's prompt and head: only its
        # neurons are borrowed.
        own = expert.task in (None, data.spec.name)
        prompt = expert.prompt if own and expert.prompt is not None else dense.prompt.detach()
        head = expert.head if own and expert.head is not None else dense.head_state()
        task_model = TaskModel(model, tokenizer, data.spec, prompt=prompt, head=head, max_length=dense.max_length)
        with unplugged(model, expert):
            metric, ms, extra = score(task_model)
        layers, keep = run(task_model, expert)
        name = names[i] if names is not None else (
            f"expert@{keep:.2f}" + (f" ({expert.task})" if expert.task != data.spec.name else ""))
        report.rows.append(EvalRow(name, keep, metric, ms, latency / ms, extra=extra, layers=layers))
    return report
