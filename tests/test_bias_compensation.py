"""Bias compensation: an expert's per-block output offsets (the mean contribution of the neurons it
leaves out), against a hand-sliced model whose down projections carry the same bias."""

from __future__ import annotations

import pytest
import torch

import doe
from doe.architectures import find_ffn_blocks
from doe.attribution import mean_down_inputs
from doe.localize import compensation_offsets
from doe.prompt import TaskModel
from doe.tasks import load_task
from doe.testing import assert_same_as, random_expert_indices, sliced_copy, snapshot, with_down_bias
from kernel_utils import DEVICE, triton_runs
from tiny_models import make_tiny, model_logits, sample_inputs, tiny_tokenizer

FAMILIES = ["llama", "bert", "gpt2"]
BACKENDS = ["torch"] + (["triton"] if triton_runs() else [])


def _offsets(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return [(torch.randn(b.hidden_size, generator=g) * 0.5).to(device) for b in find_ffn_blocks(model)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_offsets_equal_a_sliced_model_with_the_bias_and_restore_exactly(family, backend):
    model = make_tiny(family).to(DEVICE if backend == "triton" else "cpu")
    inputs = sample_inputs(model)
    snap = snapshot(model)
    indices = random_expert_indices(model, 0.35)
    offsets = _offsets(model)
    expert = doe.TaskExpert.from_indices(model, indices, task="toy").with_offsets(offsets)
    reference = model_logits(with_down_bias(sliced_copy(model, expert.indices), offsets), inputs)
    plain = model_logits(sliced_copy(model, expert.indices), inputs)

    doe.unplug_(model, expert, backend=backend)
    got = model_logits(model, inputs)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 20 * 1e-4 * max(1.0, plain.abs().max())  # the offsets really act
    doe.unplug_(model, expert.with_offsets(None), backend=backend)  # a switch removes them
    torch.testing.assert_close(model_logits(model, inputs), plain, atol=1e-4, rtol=1e-4)
    doe.unplug_(model, expert, backend=backend)
    assert doe.restore_(model)
    assert_same_as(model, snap)


def test_compensation_offsets_are_the_pruned_columns_times_the_mean_activation():
    model = make_tiny("llama")
    data = load_task("offline_question", max_train=12)
    tok = tiny_tokenizer([e.text for e in data.train], data.spec.label_words)
    tm = TaskModel(model, tok, data.spec, num_tokens=2, seed=0)
    means = mean_down_inputs(tm, data.train, batch_size=5)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    offsets = compensation_offsets(model, expert, means)
    for block, mean, idx, off in zip(find_ffn_blocks(model), means, expert.indices, offsets):
        pruned = torch.tensor(sorted(set(range(block.num_neurons)) - set(idx.tolist())))
        w = block.down.weight.detach()
        torch.testing.assert_close(off, w[:, pruned] @ mean[pruned], atol=1e-6, rtol=1e-5)

    # the first block sees the same inputs with and without the expert: with the offsets its
    # output keeps the dense mean over the text's tokens (the soft prompt's positions left out)
    block0 = find_ffn_blocks(model)[0]
    outs = {}

    def grab(name):
        def hook(module, args, out):
            outs[name] = out.detach()
        return hook

    enc = tm.encode(data.train)
    mask = tm.full_attention_mask(enc["attention_mask"]).float().unsqueeze(-1)
    mask[:, :2] = 0  # the prompt's two positions
    with torch.no_grad():
        handle = block0.container.register_forward_hook(grab("dense"))
        tm(**enc)
        handle.remove()
        compensated = expert.with_offsets(offsets)
        with doe.unplugged(model, compensated, backend="torch"):
            handle = model.model.layers[0].mlp.register_forward_hook(grab("expert"))  # the wrapper now
            tm(**enc)
            handle.remove()
    dense_mean = (outs["dense"] * mask).sum((0, 1)) / mask.sum()
    expert_mean = (outs["expert"] * mask).sum((0, 1)) / mask.sum()
    torch.testing.assert_close(expert_mean, dense_mean, atol=1e-5, rtol=1e-4)


def test_offsets_travel_in_the_expert_file_and_are_checked(tmp_path):
    model = make_tiny("bert")
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35), task="toy")
    offsets = _offsets(model)
    offsets[1] = None  # a block may have none
    with_off = expert.with_offsets(offsets)
    assert with_off != expert and with_off.with_offsets(None) == expert
    with_off.save_pretrained(tmp_path / "e")
    loaded = doe.TaskExpert.from_pretrained(tmp_path / "e")
    assert loaded == with_off and loaded.offsets[1] is None
    torch.testing.assert_close(loaded.offsets[0], offsets[0])
    with pytest.raises(ValueError, match="offsets"):
        expert.with_offsets([torch.zeros(3)])  # one per block
    wrong = expert.with_offsets([torch.zeros(7)] * expert.num_blocks)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="output offset of 7 values"):
        doe.unplug_(model, wrong, backend="torch")
    assert not doe.is_unplugged(model)
    assert_same_as(model, snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "opt"])  # OPT flattens its rows before the FFN
def test_mixed_batches_give_each_row_its_own_experts_offsets(family, backend):
    model = make_tiny(family).to(DEVICE if backend == "triton" else "cpu")
    snap = snapshot(model)
    tasks = ["a", None, "b", "a", "c"]  # a compensated, b compensated otherwise, c plain, a dense row
    indices = {name: random_expert_indices(model, keep, seed=i + 1)
               for i, (name, keep) in enumerate([("a", 0.35), ("b", 0.2), ("c", 0.5)])}
    offsets = {"a": _offsets(model, seed=2), "b": _offsets(model, seed=3), "c": None}
    experts = {name: doe.TaskExpert.from_indices(model, idx, task=name).with_offsets(offsets[name])
               for name, idx in indices.items()}
    inputs = sample_inputs(model, batch=len(tasks), seq=6)
    expected = []
    for r, task in enumerate(tasks):  # each row alone on a hand-sliced copy with the offsets as a bias
        ref = model if task is None else sliced_copy(model, indices[task]).eval()
        if task is not None and offsets[task] is not None:
            ref = with_down_bias(ref, offsets[task])
        expected.append(model_logits(ref, {k: v[r:r + 1] for k, v in inputs.items()}))
    doe.unplug_(model, experts, backend=backend)
    with doe.mixed_batch(model, tasks):
        mixed = model_logits(model, inputs)
    for r in range(len(tasks)):
        torch.testing.assert_close(mixed[r:r + 1], expected[r], atol=2e-4, rtol=2e-4, msg=lambda m: f"row {r}: {m}")
    doe.unplug_(model, {name: e.with_offsets(None) for name, e in experts.items()}, backend=backend)
    with doe.mixed_batch(model, tasks):  # a mapping without offsets drops them
        plain = model_logits(model, inputs)
    assert (plain[0] - mixed[0]).abs().max() > 1e-3 and torch.allclose(plain[4], mixed[4], atol=1e-5)
    doe.restore_(model)
    assert_same_as(model, snap)


@pytest.mark.parametrize("compensation,reprobe,expected", [("auto", True, False), ("auto", False, True),
                                                           (True, True, True), (False, False, False)])
def test_find_expert_compensates_unless_auto_meets_a_reprobed_head(compensation, reprobe, expected):
    from doe.attribution import AttributionConfig
    from doe.localize import ExpertSearchConfig, LocalizationConfig, find_expert
    from doe.prompt import PromptTuningConfig

    data = load_task("offline_sentiment", max_train=12, max_eval=4)
    model = make_tiny("llama")
    tok = tiny_tokenizer([e.text for e in data.train])
    config = ExpertSearchConfig(
        prompt=PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, readout="mean", readout_layer=None),
        attribution=AttributionConfig(show_progress=False), retune_epochs=0, reprobe=reprobe,
        localization=LocalizationConfig(keep_ratio=0.5, dense_blocks=(), bias_compensation=compensation))
    found = find_expert(model, tok, data, config)
    if not expected:
        assert found.expert.offsets is None
        return
    means = mean_down_inputs(found.task_model, list(data.train), config.attribution.batch_size)
    for got, want in zip(found.expert.offsets, compensation_offsets(model, found.expert, means)):
        torch.testing.assert_close(got, want)


def test_bias_compensation_refuses_other_values():
    from doe.localize import LocalizationConfig

    with pytest.raises(ValueError, match="bias_compensation: expected True, False or 'auto', got 'yes'"):
        LocalizationConfig(bias_compensation="yes")
