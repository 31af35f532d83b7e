"""Neuron scores for localization: attribution and the baselines, accumulated as sums + counts.

For every FFN intermediate neuron (the input of the down projection, h: (B, T, I)):

    attribution     mean |h * d(gold logit)/dh|             (the DoE paper's score; with
                    target="log_prob", d(log p(gold))/dh: the gold label against the others;
                    generation tasks: d(log-likelihood of the completion)/dh, teacher-forced)
    activation      mean |h|
    gradient        mean |d(gold logit)/dh|
    integrated_gradients   mean |h * avg_a d(gold logit)/dh (a * h)|, a in (0, 1], per layer
    random          uniform noise (a baseline)
    skill           skill-neuron predictivity (Wang et al., EMNLP 2022): how well thresholding
                    the neuron's mean activation over the prompt tokens predicts the label

Means run over examples and non-padding tokens (prompt tokens included). A head that reads an
earlier layer reaches only the blocks up to it: the scores say so (``NeuronScores.depth``) and the
blocks after it score zero. Scores are kept as
fp32 sums and token counts so shards combine by addition; under torch.distributed they are
all-reduced, so localization of a large model can run data-parallel.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from doe import progress
from doe.architectures import find_ffn_blocks
from doe.models import eval_mode, frozen
from doe.prompt import TaskModel
from doe.tasks import Example, TaskData

__all__ = ["METHODS", "TARGETS", "AttributionConfig", "NeuronScores", "score_neurons"]

METHODS = ("attribution", "activation", "gradient", "integrated_gradients", "random", "skill")
TARGETS = ("logit", "log_prob")
_NEEDS_GRAD = ("attribution", "gradient", "integrated_gradients")


@dataclass
class AttributionConfig:
    """How neurons are scored (``METHODS``, gradient ``TARGETS``) and on how many examples."""

    method: str = "attribution"
    target: str = "log_prob"  # what the gradient is of: the gold label's log-probability or its logit
    batch_size: int = 16
    max_examples: Optional[int] = None
    ig_steps: int = 4
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"AttributionConfig.method: expected one of {METHODS}, got {self.method!r}")
        if self.target not in TARGETS:
            raise ValueError(f"AttributionConfig.target: expected one of {TARGETS}, got {self.target!r}")
        if self.batch_size < 1 or self.ig_steps < 1:
            raise ValueError(f"AttributionConfig: batch_size and ig_steps must be >= 1, got "
                             f"{self.batch_size} and {self.ig_steps}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"AttributionConfig.max_examples: expected >= 1 or None, got {self.max_examples}")

    def to_dict(self) -> dict:
        return asdict(self)


def reached_blocks(depth: Optional[int], num_blocks: int) -> int:
    """How many of ``num_blocks`` FFN blocks a task runs when its head reads after ``depth``
    layers (None: all of them)."""
    return num_blocks if depth is None else min(depth, num_blocks)


@dataclass
class NeuronScores:
    """Per FFN block: fp32 score sums (I,) and the count they were summed over."""

    sums: list[torch.Tensor]
    counts: list[float]
    method: str = "attribution"
    extra: dict = field(default_factory=dict)
    depth: Optional[int] = None  # the task reads the first ``depth`` blocks only (None: all)

    def means(self) -> list[torch.Tensor]:
        return [s / max(c, 1.0) for s, c in zip(self.sums, self.counts)]

    def __add__(self, other: "NeuronScores") -> "NeuronScores":
        if (self.method != other.method or [s.shape for s in self.sums] != [s.shape for s in other.sums]
                or self.depth != other.depth):
            raise ValueError("can only add NeuronScores of one method, one model and one readout depth")
        return NeuronScores([a + b for a, b in zip(self.sums, other.sums)],
                            [a + b for a, b in zip(self.counts, other.counts)], self.method, depth=self.depth)

    def all_reduce_(self) -> "NeuronScores":
        """Sum shards over torch.distributed ranks (no-op when not initialised)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            flat = torch.cat([s.flatten() for s in self.sums] + [torch.tensor(self.counts, dtype=torch.float32)])
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else flat.device
            flat = flat.to(dev)
            dist.all_reduce(flat)
            flat = flat.cpu()
            offset = 0
            for i, s in enumerate(self.sums):
                self.sums[i] = flat[offset : offset + s.numel()].view_as(s).clone()
                offset += s.numel()
            self.counts = flat[offset:].tolist()
        return self


@contextmanager
def _capture_down_inputs(blocks, scale: Optional[dict] = None):
    """Record each block's down-projection input h (B, T, I); optionally scale one layer's h."""
    captured: list[Optional[torch.Tensor]] = [None] * len(blocks)
    handles = []

    def make_hook(i):
        def hook(module, args):
            h = args[0]
            if scale is not None and scale.get("layer") == i:
                h = h * scale["alpha"]
                captured[i] = h
                return (h,) + tuple(args[1:])
            captured[i] = h
            return None

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.down.register_forward_pre_hook(make_hook(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def _token_mask(task_model: TaskModel, attention_mask: torch.Tensor, h: torch.Tensor,
                prompt: bool = True) -> torch.Tensor:
    """(B, T) mask of real tokens (the soft prompt's too unless ``prompt=False``) aligned with h,
    or all ones for (B, T) h's that don't carry the prompt (T5 decoder)."""
    full = task_model.full_attention_mask(attention_mask)
    if h.dim() == 3 and h.shape[1] == full.shape[1]:
        if not prompt:
            full = full.clone()
            full[:, : task_model.prompt.shape[0]] = 0
        return full.to(h.dtype)
    return torch.ones(h.shape[:-1], dtype=h.dtype, device=h.device)


def score_neurons(task_model: TaskModel, data: TaskData | Sequence[Example], config: AttributionConfig) -> NeuronScores:
    """Score every FFN neuron of ``task_model.model`` on ``data`` (train split of a TaskData)."""
    examples = list(data.train if isinstance(data, TaskData) else data)
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    if not examples:
        raise ValueError("score_neurons: expected at least one example, got none")
    blocks = find_ffn_blocks(task_model.model)
    sums = [torch.zeros(b.num_neurons, dtype=torch.float32) for b in blocks]
    counts = [0.0] * len(blocks)
    if config.method == "skill" and task_model.spec.is_generation:
        raise ValueError("score_neurons: method 'skill' predicts class labels; a generation task has none")
    depth = getattr(task_model, "readout_layer", None)
    if config.method == "random":
        g = torch.Generator().manual_seed(config.seed)
        sums = [torch.rand(b.num_neurons, generator=g) * (depth is None or i < depth) for i, b in enumerate(blocks)]
        return NeuronScores(sums, [1.0] * len(blocks), "random", depth=depth)

    skill_acts: list[list[torch.Tensor]] = [[] for _ in blocks]
    labels_all: list[int] = []
    # Everything frozen but the prompt, which carries the gradient into every layer.
    with eval_mode(task_model), frozen(list(task_model.parameters())):
        task_model.prompt.requires_grad_(config.method in _NEEDS_GRAD)
        bar = progress.bar(f"scoring neurons of {task_model.spec.name} ({config.method})",
                           iterable=range(0, len(examples), config.batch_size), enabled=config.show_progress)
        for start in bar:
            batch = examples[start : start + config.batch_size]
            enc = task_model.encode(batch)
            labels_all += [e.label for e in batch]
            if config.method == "integrated_gradients":
                _integrated_gradients(task_model, blocks, enc, batch, config, sums, counts)
                continue
            with torch.set_grad_enabled(config.method in _NEEDS_GRAD), _capture_down_inputs(blocks) as hs:
                if config.method in _NEEDS_GRAD:
                    objective = task_model.objective(enc, batch, config.target)
                    reached = [h for h in hs if h is not None]  # the blocks before the layer the head reads
                    grads = iter(torch.autograd.grad(objective, reached))
                    grads = [None if h is None else next(grads) for h in hs]
                else:
                    task_model(**enc)
                    grads = [None] * len(hs)
            for i, (h, dh) in enumerate(zip(hs, grads)):
                if h is None:
                    continue
                mask = _token_mask(task_model, enc["attention_mask"], h)
                if config.method == "skill":
                    n = task_model.prompt.shape[0]
                    skill_acts[i].append(h[:, :n].float().mean(1).cpu() if h.shape[1] > n else h.float().mean(1).cpu())
                    continue
                value = {"attribution": lambda: h * dh, "gradient": lambda: dh, "activation": lambda: h}[config.method]()
                sums[i] += (value.float().abs() * mask.float().unsqueeze(-1)).sum(dim=tuple(range(h.dim() - 1))).cpu()
                counts[i] += float(mask.sum())
    if config.method == "skill":
        skill = _skill_scores(skill_acts, labels_all, task_model.num_labels, [b.num_neurons for b in blocks])
        skill.depth = depth
        return skill
    return NeuronScores(sums, counts, config.method, depth=depth).all_reduce_()


def mean_down_inputs(task_model: TaskModel, examples: Sequence[Example], batch_size: int = 16) -> list[torch.Tensor]:
    """Per FFN block, the mean of each neuron's activation h (the down projection's input; signed,
    fp32, (I,)) over the text tokens of ``examples`` run through the dense ``task_model`` (with
    its prompt). The soft prompt's own positions are left out: tuned prompt vectors drive some
    neurons far beyond what text does (on MiniLM / Reuters R8 they tripled the first layer's
    compensation and took an expert from 90% to chance; without them it scored 93%)."""
    examples = list(examples)
    if not examples:
        raise ValueError("mean_down_inputs: expected at least one example, got none")
    blocks = find_ffn_blocks(task_model.model)
    sums = [torch.zeros(b.num_neurons, dtype=torch.float64) for b in blocks]
    counts = [0.0] * len(blocks)
    with eval_mode(task_model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            enc = task_model.encode(examples[start : start + batch_size])
            with _capture_down_inputs(blocks) as hs:
                task_model(**enc)
            for i, h in enumerate(hs):
                if h is None:  # after the layer the head reads: never run, mean 0
                    continue
                mask = _token_mask(task_model, enc["attention_mask"], h, prompt=False).double()
                sums[i] += (h.double() * mask.unsqueeze(-1)).sum(dim=tuple(range(h.dim() - 1))).cpu()
                counts[i] += float(mask.sum())
    return [(s / max(c, 1.0)).float() for s, c in zip(sums, counts)]


def _integrated_gradients(task_model, blocks, enc, examples, config, sums, counts) -> None:
    """Per layer: h * mean over alpha in {1/steps, ..., 1} of d(gold)/dh at alpha * h."""
    with torch.no_grad(), _capture_down_inputs(blocks) as hs:
        task_model(**enc)
    base = [None if h is None else h.detach() for h in hs]
    steps = config.ig_steps
    for i in range(len(blocks)):
        if base[i] is None:  # after the layer the head reads
            continue
        total = torch.zeros_like(base[i], dtype=torch.float32)
        for k in range(1, steps + 1):
            scale = {"layer": i, "alpha": k / steps}
            with torch.enable_grad(), _capture_down_inputs(blocks, scale) as hs:
                (dh,) = torch.autograd.grad(task_model.objective(enc, examples, config.target), [hs[i]])
            total += dh.float()
        value = (base[i].float() * total / steps).abs()
        mask = _token_mask(task_model, enc["attention_mask"], base[i]).float()
        sums[i] += (value * mask.unsqueeze(-1)).sum(dim=tuple(range(value.dim() - 1))).cpu()
        counts[i] += float(mask.sum())


def _skill_scores(acts: list[list[torch.Tensor]], labels: list[int], num_labels: int,
                  sizes: Optional[Sequence[int]] = None) -> NeuronScores:
    """Predictivity: best one-vs-rest accuracy of thresholding each neuron at its mean (0 for
    blocks the task never ran)."""
    y = torch.tensor(labels)
    sums = []
    for layer, size in zip(acts, sizes or [0] * len(acts)):
        if not layer:
            sums.append(torch.zeros(size))
            continue
        a = torch.cat(layer)  # (E, I)
        above = a > a.mean(0, keepdim=True)
        best = torch.zeros(a.shape[1])
        for c in range(num_labels):
            is_c = (y == c).unsqueeze(1)
            acc = (above == is_c).float().mean(0)
            best = torch.maximum(best, torch.maximum(acc, 1 - acc))
        sums.append(best)
    return NeuronScores(sums, [1.0] * len(sums), "skill")
