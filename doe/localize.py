"""Localization: keep the top-scoring FFN neurons at a keep ratio; the whole DoE recipe.

    result = doe.find_expert(model, tokenizer, "offline_sentiment")   # tune, score, localize
    result.expert        # TaskExpert with indices, prompt and head
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn as nn

from doe.architectures import find_ffn_blocks
from doe.attribution import AttributionConfig, NeuronScores, mean_down_inputs, reached_blocks, score_neurons
from doe.backbone import LayerReplay, layer_index
from doe.expert import TaskExpert, model_fingerprint
from doe.locking import model_lock
from doe.models import model_source
from doe.models import eval_mode, frozen
from doe.probe import probe_head
from doe.prompt import PromptTuningConfig, PromptTuningResult, TaskModel, probes_head, prompt_tune
from doe.tasks import Example, TaskData, TaskSpec, get_task, load_task, spec_to_dict
from doe.unplug import unplugged

__all__ = ["LocalizationConfig", "localize", "compensation_offsets", "block_sensitivity", "choose_dense_blocks",
           "ExpertSearchConfig", "ExpertSearchResult", "find_expert"]


@dataclass
class LocalizationConfig:
    """keep_ratio: fraction of FFN neurons kept (0.35 = the paper's 65% pruning).
    scope: "layer" keeps that fraction in every block, "global" ranks all neurons together
    (each block keeps at least ``min_per_layer``). bias_compensation: the expert adds back the
    mean contribution of the neurons it leaves out (``compensation_offsets``); "auto" (resolved
    by ``find_expert``) compensates unless the expert's head is fitted again on the expert's
    states (a re-probed decoder head), where it measured worse once the sensitive blocks were
    kept whole. The defaults are what measured best on SmolLM2 and MiniLM (Reuters R8:
    benchmarks/results/2026-12-05-cpu/ablation-r8-*.md, 2026-12-06-cpu/ablation-r8-dense-blocks.md).
    multiple_of: round each block's count to a multiple the kernels like (e.g. 16), never above
    the block size. dense_blocks: blocks kept whole; the others share what remains of the keep
    ratio. "auto" (resolved by ``find_expert``; ``localize`` alone, with no task to measure,
    keeps none whole): the blocks whose pruning alone raises the task's training
    loss more than ``sensitivity_factor`` times the median block's (``block_sensitivity``). On
    SmolLM2 that is the first FFN, which acts as a per-token lookup: neurons scored on the
    training texts do not cover unseen words, and pruning it alone took a generation task's
    held-out NLL from 0.56 to 5.8."""

    keep_ratio: float = 0.35
    scope: str = "global"
    multiple_of: Optional[int] = None
    min_per_layer: int = 1
    bias_compensation: bool | str = "auto"
    dense_blocks: tuple | str = "auto"
    #: 5 rather than 10: SmolLM2 past-tense analogies, held-out NLL at keep 0.35 1.55 -> 1.24 (one
    #: more block whole), at keep 0.2 1.85 -> 2.14; R8 keeps the first block only either way
    sensitivity_factor: float = 5.0

    def __post_init__(self) -> None:
        if not (isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1):
            raise ValueError(f"LocalizationConfig.keep_ratio: expected a fraction in (0, 1], got {self.keep_ratio!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"LocalizationConfig.scope: expected 'layer' or 'global', got {self.scope!r}")
        if self.multiple_of is not None and (not isinstance(self.multiple_of, int) or self.multiple_of < 1):
            raise ValueError(f"LocalizationConfig.multiple_of: expected a positive int or None, got {self.multiple_of!r}")
        if not isinstance(self.min_per_layer, int) or self.min_per_layer < 1:
            raise ValueError(f"LocalizationConfig.min_per_layer: expected an int >= 1, got {self.min_per_layer!r}")
        if self.bias_compensation not in (True, False, "auto"):
            raise ValueError(f"LocalizationConfig.bias_compensation: expected True, False or 'auto', got "
                             f"{self.bias_compensation!r}")
        self.bias_compensation = self.bias_compensation if self.bias_compensation == "auto" else bool(
            self.bias_compensation)
        blocks = self.dense_blocks
        if blocks != "auto" and (not isinstance(blocks, (tuple, list)) or len(set(blocks)) != len(blocks) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)):
            raise ValueError(f"LocalizationConfig.dense_blocks: expected 'auto' or distinct block numbers >= 0, "
                             f"got {blocks!r}")
        self.dense_blocks = blocks if blocks == "auto" else tuple(sorted(blocks))
        if not (isinstance(self.sensitivity_factor, (int, float)) and self.sensitivity_factor > 0):
            raise ValueError(f"LocalizationConfig.sensitivity_factor: expected > 0, got {self.sensitivity_factor!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _round(count: int, total: int, config: LocalizationConfig) -> int:
    if config.multiple_of:
        m = config.multiple_of
        count = max(m, int(round(count / m)) * m)
    return max(config.min_per_layer, min(count, total))


def _layer_counts(means: list[torch.Tensor], config: LocalizationConfig) -> list[int]:
    totals = [m.numel() for m in means]
    dense = [i for i in config.dense_blocks if i < len(means)]
    if dense:  # the dense blocks take their whole size out of the budget; the rest share what remains
        budget = config.keep_ratio * sum(totals) - sum(totals[i] for i in dense)
        rest = [i for i in range(len(means)) if i not in dense]
        if budget < len(rest) * config.min_per_layer:
            raise ValueError(f"LocalizationConfig: keep {config.keep_ratio} of {sum(totals)} neurons leaves "
                             f"{max(budget, 0):.0f} after the dense blocks {list(dense)}; expected at least "
                             f"{config.min_per_layer} per other block")
        counts = list(totals)
        if rest:
            ratio = min(1.0, budget / sum(totals[i] for i in rest))
            sub = replace(config, keep_ratio=ratio, dense_blocks=())
            for i, c in zip(rest, _layer_counts([means[i] for i in rest], sub)):
                counts[i] = c
        return counts
    if config.scope == "layer":
        return [_round(math.ceil(config.keep_ratio * n - 1e-9), n, config) for n in totals]
    # Global: rank every neuron of the model together on per-block normalised scores (blocks
    # differ in scale), then count what each block got.
    normed = torch.cat([m / m.mean().clamp_min(1e-12) for m in means])
    k = max(1, math.ceil(config.keep_ratio * normed.numel() - 1e-9))
    top = torch.topk(normed, k).indices
    owner = torch.repeat_interleave(torch.arange(len(means)), torch.tensor(totals))
    per_block = torch.bincount(owner[top], minlength=len(means)).tolist()
    return [_round(c, n, config) for c, n in zip(per_block, totals)]


def localize(
    model: nn.Module,
    scores: NeuronScores,
    config: LocalizationConfig = LocalizationConfig(),
    *,
    task: Optional[str] = None,
    metadata: Optional[dict] = None,
) -> TaskExpert:
    """Keep the top-scoring neurons of every FFN block of ``model``.

    Args:
        model: the model the scores were computed on.
        scores: per-block neuron scores (``score_neurons``).
        config: keep ratio, per-layer or global top-k, rounding; over the blocks the task
            reaches (``scores.depth``), the blocks after them keep ``min_per_layer`` neurons.
        task, metadata: recorded in the expert.

    Returns:
        A TaskExpert with sorted int32 indices per block (no prompt yet).
    """
    means = scores.means()
    if config.dense_blocks == "auto":  # measured on the task by find_expert / choose_dense_blocks
        config = replace(config, dense_blocks=())
    if any(b >= len(means) for b in config.dense_blocks):
        raise ValueError(f"LocalizationConfig.dense_blocks: expected block numbers below {len(means)} (this "
                         f"model's FFN blocks), got {list(config.dense_blocks)}")
    reached = reached_blocks(scores.depth, len(means))
    # blocks after the layer the task's head reads never run for it: the fewest neurons there
    counts = _layer_counts(means[:reached], config) + [config.min_per_layer] * (len(means) - reached)
    indices = []
    for m, count in zip(means, counts):
        # Ties (e.g. zero scores) are broken by index so localization is deterministic.
        order = torch.argsort(m.double() - torch.arange(m.numel(), dtype=torch.float64) * 1e-12, descending=True,
                              stable=True)
        indices.append(order[:count].sort().values.to(torch.int32))
    meta = {"method": scores.method, "localization": config.to_dict(), **(metadata or {})}
    if scores.depth is not None:
        meta["readout_depth"] = scores.depth
    return TaskExpert.from_indices(model, indices, task=task, metadata=meta)


def compensation_offsets(model: nn.Module, expert: TaskExpert, means: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per FFN block, ``W_down[:, pruned] @ means[pruned]`` (hidden,): what the neurons the expert
    leaves out add to the block's output on average (``means``: each neuron's mean activation,
    ``mean_down_inputs``). Adding it back keeps the mean of every block's output where it was."""
    blocks = find_ffn_blocks(model)
    if len(means) != len(blocks) or expert.num_blocks != len(blocks):
        raise ValueError(f"expected {len(blocks)} blocks of means and expert lists, got {len(means)} and "
                         f"{expert.num_blocks}")
    out = []
    for block, mean, idx in zip(blocks, means, expert.indices):
        w = block.down.weight.detach()
        w = w.t() if block.kind == "conv1d" else w  # (hidden, I) either way
        pruned = torch.ones(block.num_neurons, dtype=torch.bool)
        pruned[idx.long()] = False
        m = mean.to(torch.float32) * pruned
        out.append((w.float() @ m.to(w.device)).cpu())
    return out


@torch.no_grad()
def block_sensitivity(task_model: TaskModel, expert: TaskExpert, examples: Sequence[Example],
                      batch_size: int = 16) -> list[float]:
    """Per FFN block, how much pruning that block alone to ``expert``'s neurons raises the mean
    task loss of the dense ``task_model`` on ``examples`` (0 for a block the expert keeps whole or
    the task never runs). Each block's pass runs the layers from the block's on only (the ones
    before answer the dense pass's outputs, ``LayerReplay``)."""
    model, examples = task_model.model, list(examples)
    if not examples:
        raise ValueError("block_sensitivity: expected at least one example, got none")

    def loss() -> float:
        total = 0.0
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            total += float(task_model.loss(batch)) * len(batch)
        return total / len(examples)

    depth = reached_blocks(task_model.readout_layer, expert.num_blocks)
    whole = [torch.arange(n, dtype=torch.int32) for n in expert.num_neurons]
    measured = [i for i, (kept, n) in enumerate(zip(expert.kept, expert.num_neurons)) if i < depth and kept < n]
    # a block inside layer j leaves layers 0..j-1 as they were: they answer the dense pass's outputs
    starts = {i: layer_index(model, block.name) or 0 for i, block in enumerate(find_ffn_blocks(model)) if i in measured}
    replay = LayerReplay(model, max(starts.values(), default=0))
    rises = [0.0] * expert.num_blocks
    with model_lock(model), eval_mode(model):  # no other thread's forward meets the recording or the stand-ins
        with replay.recording():
            base = loss()
        for i in measured:
            with unplugged(model, TaskExpert.from_indices(model, whole[:i] + [expert.indices[i]] + whole[i + 1:])), \
                    replay.skipping(starts[i]):
                rises[i] = loss() - base
    return rises


#: the least share of the keep ratio the blocks not kept whole are left. On SmolLM2 / Reuters R8
#: (head after 8 blocks, keep 0.2) half refused the first FFN, whose pruning alone raised the loss
#: 170 times the median block's, and the experts lost more than with it whole at 43% of the share
_REST_SHARE = 0.25


def _sensitive_blocks(rises: Sequence[float], config: LocalizationConfig, totals: Sequence[int]) -> tuple:
    """The blocks ``dense_blocks='auto'`` keeps whole: rises above ``sensitivity_factor`` times the
    median of the blocks measured, most sensitive first while the keep ratio leaves the others
    at least a quarter of their share (``_REST_SHARE``)."""
    measured = sorted(abs(r) for r in rises if r != 0.0)
    if not measured:
        return ()
    bar = config.sensitivity_factor * max(measured[len(measured) // 2], 1e-6)
    whole = sum(totals)
    chosen, taken, budget = [], 0, config.keep_ratio * whole
    for i in sorted(range(len(rises)), key=lambda b: -rises[b]):
        rest = whole - taken - totals[i]
        if rises[i] <= bar or (rest and budget - taken - totals[i] < _REST_SHARE * config.keep_ratio * rest):
            break
        chosen.append(i)
        taken += totals[i]
    return tuple(sorted(chosen))


def _block_outputs(blocks: Sequence) -> list[str]:
    """Per FFN block, the name of the module whose output is the block's (the one that carries
    an expert's output offset once unplugged)."""
    return [b.name if b.gated else f"{b.name}.{b.down_name}" for b in blocks]


@contextmanager
def _added_to_outputs(model: nn.Module, names: Sequence[str], vectors: Sequence[torch.Tensor]):
    """Add ``vectors[i]`` (hidden,) to the output of the module named ``names[i]`` while inside."""
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, args, out, v=v: out + v.to(out.dtype))
             for n, v in zip(names, vectors)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def choose_dense_blocks(task_model: TaskModel, scores: NeuronScores, config: LocalizationConfig,
                        examples: Sequence[Example], batch_size: int = 16) -> tuple[LocalizationConfig, list[float]]:
    """``config`` with ``dense_blocks`` resolved (what "auto" means: the blocks ``block_sensitivity``
    finds on ``examples`` for the expert localized without dense blocks, then picked by the rule
    of ``_sensitive_blocks``), and the sensitivities measured."""
    first = localize(task_model.model, scores, replace(config, dense_blocks=()))
    rises = block_sensitivity(task_model, first, examples, batch_size)
    reached = reached_blocks(scores.depth, len(rises))  # the blocks the keep is over
    chosen = _sensitive_blocks(rises[:reached], config, first.num_neurons[:reached])
    return replace(config, dense_blocks=chosen), rises


@dataclass
class ExpertSearchConfig:
    """The whole recipe: prompt tuning, scoring, localization, optional re-probing and re-tuning."""

    prompt: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    localization: LocalizationConfig = field(default_factory=LocalizationConfig)
    retune_epochs: int = 2  # re-tune the prompt on the expert-localized model (0 = skip)
    retune_head_lr: float = 1e-2  # the head only needs to adapt, not to be learned again
    #: a head that started as a probe (``PromptTuningConfig.head_init``) is fitted again on the
    #: expert's states: pruning moves the states the dense probe was fitted on
    reprobe: bool = True
    #: re-tune after a re-probe too (at ``probe_head_lr``); off: on SmolLM2 / Reuters R8 (3 seeds)
    #: it moved accuracy by +0.5 points at keep 0.35 and -2.5 at keep 0.2
    retune_after_reprobe: bool = False
    #: re-tuning also trains each block's output offset (one hidden-size vector, starting at its
    #: bias compensation): True, False or "auto" (generation tasks, where it measured better:
    #: SmolLM2 past-tense analogies, held-out NLL 1.83 -> 1.39 at keep 0.35)
    retune_offsets: bool | str = "auto"
    retune_offset_lr: float = 1e-2
    sensitivity_examples: int = 64  # training examples ``dense_blocks="auto"`` measures blocks on

    def __post_init__(self) -> None:
        if self.retune_epochs < 0:
            raise ValueError(f"ExpertSearchConfig.retune_epochs: expected >= 0, got {self.retune_epochs}")
        if self.retune_offsets not in (True, False, "auto"):
            raise ValueError(f"ExpertSearchConfig.retune_offsets: expected True, False or 'auto', got "
                             f"{self.retune_offsets!r}")
        if not self.retune_offset_lr > 0 or not (isinstance(self.sensitivity_examples, int)
                                                 and self.sensitivity_examples >= 1):
            raise ValueError(f"ExpertSearchConfig: expected retune_offset_lr > 0 and sensitivity_examples >= 1, got "
                             f"{self.retune_offset_lr!r} and {self.sensitivity_examples!r}")
        if not self.retune_head_lr > 0:
            raise ValueError(f"ExpertSearchConfig.retune_head_lr: expected > 0, got {self.retune_head_lr}")

    def to_dict(self) -> dict:
        return {"prompt": self.prompt.to_dict(), "attribution": self.attribution.to_dict(),
                "localization": self.localization.to_dict(), "retune_epochs": self.retune_epochs,
                "retune_head_lr": self.retune_head_lr, "reprobe": self.reprobe,
                "retune_after_reprobe": self.retune_after_reprobe, "retune_offsets": self.retune_offsets,
                "retune_offset_lr": self.retune_offset_lr, "sensitivity_examples": self.sensitivity_examples}

    def reprobes(self, kind: str) -> bool:
        """Whether the expert's head is fitted again on a model of ``kind`` (encoder, decoder, ...)."""
        return self.reprobe and probes_head(self.prompt, kind) and self.prompt.readout != "verbalizer"

    def retunes(self, kind: str) -> bool:
        """Whether the prompt is tuned again on the expert of a model of ``kind``."""
        return self._retunes_after(self.reprobes(kind))

    def _retunes_after(self, reprobed: bool) -> bool:
        return self.retune_epochs > 0 and (self.retune_after_reprobe or not reprobed)


@dataclass
class ExpertSearchResult:
    """What ``find_expert`` made: the expert and the steps that can be reused."""

    expert: TaskExpert
    task_model: TaskModel  # carries the tuned prompt/head of the dense model
    scores: NeuronScores
    tuning: PromptTuningResult


def find_expert(
    model: nn.Module,
    tokenizer,
    task: str | TaskSpec | TaskData,
    config: ExpertSearchConfig = ExpertSearchConfig(),
    *,
    task_model: Optional[TaskModel] = None,
    scores: Optional[NeuronScores] = None,
) -> ExpertSearchResult:
    """Tune a prompt on the frozen ``model``, score its FFN neurons, keep the top ones.

    Pass ``task_model`` (already tuned) and/or ``scores`` to reuse earlier steps, e.g. to
    localize one task at several keep ratios. The expert carries the prompt and head.

    Args:
        model, tokenizer: the backbone; its weights are not changed.
        task: a task name, spec, or loaded data.
        config: prompt tuning, attribution, localization and re-tuning settings.
        task_model: a TaskModel already tuned on this task (skips prompt tuning).
        scores: neuron scores already computed (skips attribution).

    Returns:
        An ExpertSearchResult: the expert, the dense task model, the scores, the tuning run.
    """
    data = task if isinstance(task, TaskData) else load_task(get_task(task))
    tuning = None
    if task_model is None:
        task_model = TaskModel(model, tokenizer, data.spec, num_tokens=config.prompt.num_tokens,
                               max_length=config.prompt.max_length, seed=config.prompt.seed,
                               readout=config.prompt.readout)
        tuning = prompt_tune(task_model, data, config.prompt)
    if tuning is None:
        tuning = PromptTuningResult(task_model.prompt.detach().cpu().clone(), task_model.head_state())
    if scores is None:
        scores = score_neurons(task_model, data, config.attribution)
    meta = {"search": config.to_dict(), "model_name": model_source(model),
            "task_spec": spec_to_dict(data.spec)}
    local = config.localization
    if local.dense_blocks == "auto":
        local, rises = choose_dense_blocks(task_model, scores, local, list(data.train)[: config.sensitivity_examples],
                                           config.attribution.batch_size)
        meta["block_sensitivity"] = [round(r, 4) for r in rises]
    expert = localize(model, scores, local, task=data.spec.name, metadata=meta)
    reprobe = config.reprobe and probes_head(config.prompt, task_model)
    if local.bias_compensation is True or (local.bias_compensation == "auto" and not reprobe):
        means = scores.extra.get("mean_down_inputs")
        if means is None:  # one dense pass, kept with the scores for the next keep ratio
            examples = list(data.train)[: config.attribution.max_examples or None]
            means = scores.extra["mean_down_inputs"] = mean_down_inputs(task_model, examples,
                                                                        config.attribution.batch_size)
        expert = expert.with_offsets(compensation_offsets(model, expert, means))
    prompt, head = tuning.prompt, tuning.head
    retune = config._retunes_after(reprobe)
    if retune or reprobe:
        retuned = TaskModel(model, tokenizer, data.spec, prompt=prompt, head=head,
                            max_length=config.prompt.max_length, readout=task_model.readout)
        learn = retune and config.retune_offsets in (True, "auto" if data.spec.is_generation else True)
        blocks = find_ffn_blocks(model) if learn else []
        outputs = _block_outputs(blocks)
        deltas = [torch.zeros(b.hidden_size, device=task_model.device, requires_grad=True) for b in blocks]
        with unplugged(model, expert), _added_to_outputs(model, outputs, deltas):
            if reprobe:
                with eval_mode(model), frozen(list(model.parameters())):
                    probe_head(retuned, list(data.train), config.prompt.batch_size)
            if retune:
                head_lr = config.prompt.probe_head_lr if reprobe else config.retune_head_lr
                retune_cfg = PromptTuningConfig(**{**config.prompt.to_dict(), "epochs": config.retune_epochs,
                                                   "head_lr": head_lr})
                prompt_tune(retuned, data, retune_cfg, phase_name=f"re-tuning {data.spec.name} on its expert "
                                                                  f"(keep {expert.keep_ratio:.2f})",
                            extra=[{"params": deltas, "lr": config.retune_offset_lr}] if learn else ())
        prompt, head = retuned.prompt.detach().cpu().clone(), retuned.head_state()
        if learn:
            expert = expert.with_offsets([d.detach().cpu() if o is None else o + d.detach().cpu()
                                          for o, d in zip(expert.offsets or [None] * len(deltas), deltas)])
    expert.prompt, expert.head = prompt, head
    expert.dense_prompt, expert.dense_head = tuning.prompt, tuning.head
    expert.fingerprint = model_fingerprint(model)
    return ExpertSearchResult(expert, task_model, scores, tuning)

