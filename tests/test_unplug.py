"""unplug_ / restore_ on tiny random configs of every supported family.

References are hand-built sliced copies (doe.testing.sliced_copy: FFN weights sliced by the
same indices) and the dense model itself; never the code under test.
"""

import threading

import pytest
import torch

import doe
from doe.testing import assert_same_as, gathered_wrappers, random_expert_indices, sliced_copy, snapshot
from kernel_utils import DEVICE, triton_runs
from tiny_models import FAMILIES, make_tiny, model_logits, sample_inputs

BACKENDS = ["torch"] + (["triton"] if triton_runs() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_unplugged_matches_sliced_copy_and_restores_exactly(family, backend):
    model = make_tiny(family).to(DEVICE if backend == "triton" else "cpu")
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    snap = snapshot(model)
    indices = random_expert_indices(model, 0.35)
    expert = doe.TaskExpert.from_indices(model, indices, task="toy")
    reference = model_logits(sliced_copy(model, expert.indices), inputs)

    doe.unplug_(model, expert, backend=backend)
    assert doe.is_unplugged(model) and doe.current_expert(model) is expert
    n_blocks = len(expert.indices)
    gated = family in ("llama", "mistral", "qwen2", "gemma", "t5-gated")
    assert len(gathered_wrappers(model)) == (n_blocks if gated else 2 * n_blocks)
    got = model_logits(model, inputs)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, dense, rtol=1e-3, atol=0)  # the expert really changed the model

    assert doe.restore_(model)
    assert not gathered_wrappers(model) and not doe.is_unplugged(model)
    assert torch.equal(model_logits(model, inputs), dense)
    assert_same_as(model, snap)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5-gated"])
def test_expert_keeping_every_neuron_gives_dense_outputs(family):
    model = make_tiny(family)
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    full = doe.TaskExpert.from_indices(model, [torch.arange(b.num_neurons) for b in doe.find_ffn_blocks(model)])
    assert full.keep_ratio == 1.0
    with doe.unplugged(model, full):
        torch.testing.assert_close(model_logits(model, inputs), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama", "t5"])
def test_switching_swaps_indices_without_touching_weights(family):
    model = make_tiny(family)
    inputs = sample_inputs(model)
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=1), task="a")
    b = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.5, seed=2), task="b")
    ref_b = model_logits(sliced_copy(model, b.indices), inputs)
    doe.unplug_(model, a)
    wrappers = gathered_wrappers(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    doe.unplug_(model, b)  # direct switch, no restore in between
    assert gathered_wrappers(model) == wrappers  # same module objects, new index buffers
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == param_bytes
    assert doe.current_expert(model) is b
    torch.testing.assert_close(model_logits(model, inputs), ref_b, atol=1e-4, rtol=1e-4)
    doe.restore_(model)


def test_switch_allocates_only_index_bytes():
    from torch.profiler import ProfilerActivity, profile

    model = make_tiny("llama")
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=1))
    b = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=2))
    doe.unplug_(model, a)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        doe.unplug_(model, b)
    allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)
    index_bytes = sum(i.numel() * i.element_size() for i in b.indices)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert allocated <= 4 * index_bytes + 4096, (allocated, index_bytes, weight_bytes)
    doe.restore_(model)


def test_print_shows_kept_neurons():
    model = make_tiny("bert")
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    with doe.unplugged(model, expert):
        text = repr(model)
    n = doe.find_ffn_blocks(model)[0].num_neurons
    assert f"GatheredLinear(mode=rows, kept={expert.kept[0]}/{n}, base_layer=Linear(" in text
    assert f"mode=cols, kept={expert.kept[0]}/{n}" in text


def test_context_manager_restores_when_body_raises():
    model = make_tiny("gpt2")
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    with pytest.raises(RuntimeError, match="boom"):
        with doe.unplugged(model, expert):
            assert doe.is_unplugged(model)
            raise RuntimeError("boom")
    assert not doe.is_unplugged(model) and not gathered_wrappers(model)
    assert torch.equal(model_logits(model, inputs), dense)


def test_nested_context_puts_the_outer_expert_back():
    model = make_tiny("llama")
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=1))
    b = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=2))
    with doe.unplugged(model, a):
        with doe.unplugged(model, b):
            assert doe.current_expert(model) is b
        assert doe.current_expert(model) is a
    assert not doe.is_unplugged(model)


def _bad_experts(model):
    blocks = doe.find_ffn_blocks(model)
    good = random_expert_indices(model, 0.35)
    n = blocks[0].num_neurons
    other = make_tiny("gpt2")
    return {
        "wrong-model-type": (lambda: doe.TaskExpert.from_indices(other, random_expert_indices(other, 0.35)),
                             "built for a 'gpt2' model, this model is 'llama'"),
        "wrong-layer-count": (lambda: doe.TaskExpert(good[:1], [n]), "expert has 1 FFN blocks, this model has 2"),
        "wrong-neuron-count": (lambda: doe.TaskExpert(good, [n + 8] * len(good)),
                               f"built for {n + 8} neurons, this model's block"),
        "out-of-range": (lambda: doe.TaskExpert([torch.tensor([0, n])] + good[1:], [n] * len(good)),
                         f"index {n} out of range"),
        "duplicated": (lambda: doe.TaskExpert.from_indices(model, [torch.tensor([3, 3, 5])] + good[1:]),
                       "duplicated index 3"),
        "float-dtype": (lambda: doe.TaskExpert.from_indices(model, [torch.tensor([1.0, 2.0])] + good[1:]),
                        "expected int32 or int64 indices"),
        "empty-layer": (lambda: doe.TaskExpert.from_indices(model, [torch.tensor([], dtype=torch.long)] + good[1:]),
                        "expected at least one kept neuron"),
        "layer-count-by-hand": (lambda: doe.TaskExpert.from_indices(model, good[:1]),
                                "expected 2 index tensors"),
    }


@pytest.mark.parametrize("case", list(_bad_experts(make_tiny("llama"))))
def test_bad_experts_raise_and_leave_model_untouched(case):
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    snap = snapshot(model)
    build, message = _bad_experts(model)[case]
    with pytest.raises((ValueError, TypeError), match=message):
        doe.unplug_(model, build())
    assert not doe.is_unplugged(model) and not gathered_wrappers(model)
    assert torch.equal(model_logits(model, inputs), dense)
    assert_same_as(model, snap)


def test_bad_switch_keeps_the_installed_expert():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    a = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    doe.unplug_(model, a)
    before = model_logits(model, inputs)
    n = doe.find_ffn_blocks(make_tiny("bert"))[0].num_neurons
    with pytest.raises(ValueError, match="expert has 1 FFN blocks"):
        doe.unplug_(model, doe.TaskExpert([torch.arange(3)], [n]))
    with pytest.raises(TypeError, match="expected a doe.TaskExpert, got list"):
        doe.unplug_(model, [torch.arange(3)])
    assert doe.current_expert(model) is a
    assert torch.equal(model_logits(model, inputs), before)
    doe.restore_(model)


def test_restore_without_unplug_is_a_noop():
    model = make_tiny("opt")
    assert doe.restore_(model) is False


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5-gated"])
def test_generate_matches_sliced_copy(family):
    model = make_tiny(family)
    inputs = sample_inputs(model, batch=1, seq=5)
    inputs.pop("decoder_input_ids", None)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = sliced_copy(model, expert.indices).generate(**inputs, **kwargs)
    with doe.unplugged(model, expert):
        got = model.generate(**inputs, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_half_precision_matches_sliced_copy(family, dtype):
    model = make_tiny(family, dtype=dtype)
    inputs = sample_inputs(model)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    want = model_logits(sliced_copy(model, expert.indices), inputs).float()
    with doe.unplugged(model, expert, backend="torch"):
        got = model_logits(model, inputs).float()
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_neuron_major_layout_and_original_layout_restore():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    want = model_logits(sliced_copy(model, expert.indices), inputs)
    downs = [b.down.weight for b in doe.find_ffn_blocks(model)]
    doe.unplug_(model, expert, layout="neuron_major")
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in downs)
    torch.testing.assert_close(model_logits(model, inputs), want, atol=1e-4, rtol=1e-4)
    doe.restore_(model, original_layout=True)
    assert all(w.is_contiguous() for w in downs)
    assert torch.equal(model_logits(model, inputs), dense)


def test_threads_never_mix_experts():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    experts = [doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=s)) for s in (1, 2)]
    refs = [model_logits(sliced_copy(model, e.indices), inputs) for e in experts]
    errors = []

    def worker(i):
        for _ in range(5):
            with doe.unplugged(model, experts[i]):
                out = model_logits(model, inputs)
            if not torch.allclose(out, refs[i], atol=1e-4, rtol=1e-4):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not doe.is_unplugged(model)


def test_model_can_be_deep_copied_after_use():
    import copy

    model = make_tiny("bert")
    inputs = sample_inputs(model)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35))
    with doe.unplugged(model, expert):
        pass
    clone = copy.deepcopy(model)
    assert torch.equal(model_logits(clone, inputs), model_logits(model, inputs))
