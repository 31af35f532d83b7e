"""The compact opt-in: experts run on compacted copies of their kept weights.

References: hand-sliced copies (doe.testing.sliced_copy, W[idx] by index_select) and the
gathered path; never the store under test. Memory is checked against sizes computed by hand.
"""

import gc

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import doe
from doe.testing import assert_same_as, gathered_wrappers, random_expert_indices, sliced_copy, snapshot
from doe_kernels import CompactWeights, GatheredLinear
from tiny_models import make_tiny, model_logits, sample_inputs

FAMILIES = ["bert", "gpt2", "llama", "t5-gated"]


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_compact_linear_matches_slice_and_follows_in_place_changes(mode, conv1d):
    torch.manual_seed(0)
    layer = (Conv1D(24, 16) if conv1d else nn.Linear(16, 24)).requires_grad_(False)  # in 16, out 24
    idx = torch.tensor([1, 4, 5, 11], dtype=torch.int32)
    wrapper = GatheredLinear(layer, idx, mode=mode)
    wrapper.compact = store = CompactWeights()
    x = torch.randn(3, 16 if mode == "rows" else 4)

    def reference():
        w = layer.weight.t() if conv1d else layer.weight  # (out, in)
        if mode == "rows":
            return x @ w[idx.long()].t() + layer.bias[idx.long()]
        return x @ w[:, idx.long()].t() + layer.bias

    torch.testing.assert_close(wrapper(x), reference())
    assert len(store) == 1
    copy = store.get(layer.weight, layer.bias, wrapper.indices, mode == "rows", conv1d)[0]
    wrapper(x)
    assert len(store) == 1 and store.get(layer.weight, layer.bias, wrapper.indices, mode == "rows", conv1d)[0] is copy
    rows_bias = 4 if mode == "rows" else 0
    assert store.nbytes == (4 * (16 if mode == "rows" else 24) + rows_bias) * 4

    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place change makes a new copy
        layer.bias.add_(1.0)
    torch.testing.assert_close(wrapper(x), reference())
    assert len(store) == 1


def test_compact_passes_input_gradients_and_leaves_weight_gradients_to_the_gathered_path():
    torch.manual_seed(0)
    layer = nn.Linear(16, 24)
    idx = torch.tensor([0, 3, 7, 20], dtype=torch.int32)
    wrapper = GatheredLinear(layer, idx, mode="rows")
    wrapper.compact = store = CompactWeights()
    x = torch.randn(5, 16, requires_grad=True)
    wrapper(x).square().sum().backward()  # weight requires grad: gathered path, weight grad right
    ref_x = x.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    (ref_x @ w[idx.long()].t() + layer.bias.detach()[idx.long()]).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert len(store) == 0

    layer.requires_grad_(False)  # a frozen backbone (prompt tuning): compact, input grad only
    x.grad = None
    wrapper(x).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert len(store) == 1


def test_copies_made_under_inference_mode_serve_autograd_later():
    layer = nn.Linear(8, 12).requires_grad_(False)
    wrapper = GatheredLinear(layer, torch.tensor([2, 3, 9], dtype=torch.int32), mode="rows")
    wrapper.compact = CompactWeights()
    with torch.inference_mode():
        wrapper(torch.randn(2, 8))
    x = torch.randn(2, 8, requires_grad=True)
    wrapper(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight[[2, 3, 9]].sum(0).expand(2, 8))


def _expected_bytes(model, expert) -> int:
    """Kept rows of the up (and gate) projections with their biases, kept columns of the down one."""
    total = 0
    for block, idx in zip(doe.find_ffn_blocks(model), expert.indices):
        n = idx.numel()
        for layer in [block.up] + ([block.gate] if block.gated else []):
            w = layer.weight
            fan_in = w.shape[0] if isinstance(layer, Conv1D) else w.shape[1]
            total += n * fan_in * w.element_size() + (n * w.element_size() if layer.bias is not None else 0)
        w = block.down.weight
        fan_out = w.shape[1] if isinstance(block.down, Conv1D) else w.shape[0]
        total += n * fan_out * w.element_size()
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_unplug_compact_matches_sliced_copy_and_keeps_copies_per_expert(family):
    model = make_tiny(family)
    inputs = sample_inputs(model)
    snap = snapshot(model)
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=1), task="a")
    b = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.2, seed=2), task="b")
    ref_a = model_logits(sliced_copy(model, a.indices), inputs)
    ref_b = model_logits(sliced_copy(model, b.indices), inputs)

    doe.unplug_(model, a, compact=True)
    assert doe.installed(model).compact and all(w.compact is not None for w in gathered_wrappers(model))
    assert doe.compact_memory(model) == 0  # made on the first forward
    torch.testing.assert_close(model_logits(model, inputs), ref_a, atol=1e-5, rtol=1e-5)
    assert doe.compact_memory(model) == _expected_bytes(model, a)

    doe.unplug_(model, b)  # a switch keeps the compact choice
    assert doe.installed(model).compact
    torch.testing.assert_close(model_logits(model, inputs), ref_b, atol=1e-5, rtol=1e-5)
    both = _expected_bytes(model, a) + _expected_bytes(model, b)
    assert doe.compact_memory(model) == both
    doe.unplug_(model, a)
    torch.testing.assert_close(model_logits(model, inputs), ref_a, atol=1e-5, rtol=1e-5)
    assert doe.compact_memory(model) == both  # reused, not made again

    doe.unplug_(model, a, compact=False)
    assert not doe.installed(model).compact and all(w.compact is None for w in gathered_wrappers(model))
    torch.testing.assert_close(model_logits(model, inputs), ref_a, atol=1e-5, rtol=1e-5)

    assert doe.restore_(model)
    assert_same_as(model, snap)  # the originals, untouched; the copies stay for the next install
    assert doe.compact_memory(model) == both
    del b
    gc.collect()
    assert doe.compact_memory(model) == _expected_bytes(model, a)  # a dropped expert frees its copies
    assert doe.release_compact(model) == _expected_bytes(model, a)
    assert doe.compact_memory(model) == 0


def test_unplugged_puts_back_the_previous_compact_choice():
    model = make_tiny("llama")
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=1), task="a")
    b = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=2), task="b")
    doe.unplug_(model, a, compact=True)
    with doe.unplugged(model, b, compact=False):
        assert not doe.installed(model).compact
    now = doe.installed(model)
    assert now.expert is a and now.compact
    with pytest.raises(TypeError, match="compact: expected True, False or None"):
        doe.unplug_(model, b, compact="yes")
    assert doe.installed(model).expert is a
    doe.restore_(model)


@pytest.mark.parametrize("compact", [False, True])
def test_experts_built_and_installed_under_inference_mode(compact):
    model = make_tiny("gpt2")
    inputs = sample_inputs(model)
    snap = snapshot(model)
    indices = random_expert_indices(model, 0.35)
    reference = model_logits(sliced_copy(model, indices), inputs)
    with torch.inference_mode():
        expert = doe.TaskExpert.from_indices(model, indices, task="t")
        doe.unplug_(model, expert, compact=compact)
        torch.testing.assert_close(model_logits(model, inputs), reference, atol=1e-5, rtol=1e-5)
        doe.restore_(model)
    assert_same_as(model, snap)
    expert.verify()  # its tensors still carry version counters
    doe.unplug_(model, expert, compact=compact)  # and install outside inference mode too
    torch.testing.assert_close(model_logits(model, inputs), reference, atol=1e-5, rtol=1e-5)
    doe.restore_(model)


def test_new_storage_or_dtype_makes_a_new_copy():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35), task="t")
    doe.unplug_(model, expert, compact=True)
    model_logits(model, inputs)
    doe.restore_(model)  # the copies outlive the install
    model.double()  # new storage and dtype behind the same Parameter objects
    reference = model_logits(sliced_copy(model, expert.indices), inputs)
    doe.unplug_(model, expert, compact=True)
    got = model_logits(model, inputs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference)
    doe.restore_(model)


def test_compact_with_a_mapping_of_experts_is_refused_before_any_change():
    from doe.runtime import UnplugAndPlay

    model = make_tiny("llama")
    snap = snapshot(model)
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=1), task="a")
    b = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=2), task="b")
    with pytest.raises(ValueError, match="compact=True applies to one expert at a time"):
        doe.unplug_(model, {"a": a, "b": b}, compact=True)
    assert not doe.is_unplugged(model)
    assert_same_as(model, snap)
    with pytest.raises(ValueError, match="choose one"):
        UnplugAndPlay(model, None, mixed=True, compact=True)


def test_gated_block_runs_gate_and_up_as_one_stacked_copy():
    from doe_kernels import GatheredGatedMLP

    torch.manual_seed(0)
    gate, up, down = nn.Linear(16, 40), nn.Linear(16, 40, bias=False), nn.Linear(40, 16, bias=False)
    for layer in (gate, up, down):
        layer.requires_grad_(False)
    block = nn.Module()
    block.gate_proj, block.up_proj, block.down_proj = gate, up, down
    idx = torch.tensor([0, 3, 4, 10, 22, 39], dtype=torch.int32)
    mlp = GatheredGatedMLP(block, gate, up, down, idx, activation="silu")
    mlp.compact = store = CompactWeights()
    offset = torch.randn(16)
    mlp.set_offset(offset)
    x = torch.randn(2, 3, 16)
    keep = idx.long()

    def reference():
        h = torch.nn.functional.silu(x @ gate.weight[keep].t() + gate.bias[keep]) * (x @ up.weight[keep].t())
        return h @ down.weight[:, keep].t() + offset

    torch.testing.assert_close(mlp(x), reference())
    assert len(store) == 2  # [gate; up] stacked (a zero bias for up) and down's columns
    assert store.nbytes == (2 * 6 * 16 + 2 * 6 + 16 * 6) * 4
    with torch.no_grad():
        up.weight.mul_(-1.5)  # an in-place change to one of the pair makes the stacked copy again
    torch.testing.assert_close(mlp(x), reference())
    assert len(store) == 2
