"""Mixed-task batches: ``doe.unplug_(model, {task: expert})`` + ``doe.mixed_batch(model, tasks)``.

Every row of a mixed batch must equal that row run alone on its own expert: on a hand-sliced
copy (doe.testing.sliced_copy, no gathered code) and on the model with that single expert
unplugged; dense rows equal the original model. Rejected arguments leave the model as it was.
"""

import contextlib

import pytest
import torch
import torch.nn as nn

import doe
from doe.testing import assert_same_as, gathered_wrappers, random_expert_indices, sliced_copy, snapshot
from doe_kernels import GatheredGatedMLP, GatheredLinear
from doe_kernels.segments import BatchGroups, GroupedIndices
from kernel_utils import triton_runs
from tiny_models import FAMILIES as ALL_FAMILIES
from tiny_models import make_tiny, model_logits, sample_inputs

FAMILIES = ["bert", "gpt2", "llama", "t5-gated"]  # one of each FFN form (the slower tests)
ROW_TASKS = ["a", None, "b", "c", "a", None]  # a: two rows, b and c: one each, two dense rows
TOL = dict(atol=1e-5, rtol=1e-5)

needs_triton = pytest.mark.skipif(not triton_runs(), reason="needs a GPU or TRITON_INTERPRET=1")


def make_experts(model, names=("a", "b", "c"), keeps=(0.35, 0.2, 0.5)):
    return {name: doe.TaskExpert.from_indices(model, random_expert_indices(model, keep, seed=i + 1), task=name)
            for i, (name, keep) in enumerate(zip(names, keeps))}


def row(inputs, r):
    return {k: v[r:r + 1] for k, v in inputs.items()}


def alone_on_sliced(model, experts, inputs, tasks):
    """Each row's logits, run alone on a hand-sliced copy of its expert (the model for dense rows)."""
    sliced = {name: sliced_copy(model, e.indices).eval() for name, e in experts.items()}
    return [model_logits(sliced[t] if t is not None else model, row(inputs, r)) for r, t in enumerate(tasks)]


def assert_rows(mixed, expected):
    for r, e in enumerate(expected):
        torch.testing.assert_close(mixed[r:r + 1], e, **TOL, msg=lambda m: f"row {r}: {m}")


@pytest.mark.parametrize("family", ALL_FAMILIES)  # OPT's FFN sees its rows flattened to (B*T, H)
def test_mixed_batch_equals_each_row_alone(family):
    model = make_tiny(family)
    snap = snapshot(model)
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=len(ROW_TASKS), seq=7)  # row 1 padded
    expected = alone_on_sliced(model, experts, inputs, ROW_TASKS)

    doe.unplug_(model, experts)
    assert doe.installed(model).experts == experts and doe.current_expert(model) is None
    with doe.mixed_batch(model, ROW_TASKS):
        mixed = model_logits(model, inputs)
    assert_rows(mixed, expected)

    # the same rows, each alone with its single expert unplugged (a switch from the mapping)
    for r, task in enumerate(ROW_TASKS):
        if task is None:
            doe.restore_(model)
        else:
            doe.unplug_(model, experts[task])
        torch.testing.assert_close(mixed[r:r + 1], model_logits(model, row(inputs, r)), **TOL)
    doe.restore_(model)
    assert_same_as(model, snap)


@needs_triton
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("seq", [7, 1], ids=["prefill", "decode"])
def test_mixed_batch_through_triton_kernels(family, seq):
    # seq 1: 6 rows, a decode-sized batch whose FFNs read the union of the experts' neurons
    model = make_tiny(family)
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=len(ROW_TASKS), seq=seq)
    expected = alone_on_sliced(model, experts, inputs, ROW_TASKS)
    with doe.unplugged(model, experts, backend="triton"), doe.mixed_batch(model, ROW_TASKS):
        assert_rows(model_logits(model, inputs), expected)


@pytest.mark.parametrize("tasks", [["b", "a", "b"], ["a", "a", "a"], [None, None, None], ["c", None, "c"]],
                         ids=["empty-groups", "one-task", "all-dense", "one-expert-and-dense"])
def test_edge_assignments(tasks):
    model = make_tiny("llama")
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=3, seq=5)
    expected = alone_on_sliced(model, experts, inputs, tasks)
    with doe.unplugged(model, experts), doe.mixed_batch(model, tasks):
        mixed = model_logits(model, inputs)
    assert_rows(mixed, expected)
    if len(set(tasks)) == 1:  # one group: the single-expert (or dense) computation, bit for bit
        task = tasks[0]
        with doe.unplugged(model, experts[task]) if task else contextlib.nullcontext():
            assert torch.equal(mixed, model_logits(model, inputs))


def test_earlier_names_of_the_batch_assignment_still_work_with_a_warning():
    import doe_kernels
    from doe_kernels.segments import TokenGroups

    with pytest.warns(DeprecationWarning, match="TokenGroups"):
        assert doe_kernels.RowGroups is TokenGroups
    model = make_tiny("llama")
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=2, seq=5)
    expected = alone_on_sliced(model, experts, inputs, ["b", None])
    with doe.unplugged(model, experts):
        with pytest.warns(DeprecationWarning, match="row_tasks"):
            with doe.mixed_batch(model, row_tasks=["b", None]):
                mixed = model_logits(model, inputs)
    assert_rows(mixed, expected)


def test_a_one_entry_mapping_mixes_its_expert_with_dense_rows():
    model = make_tiny("gpt2")
    experts = make_experts(model, names=("a",), keeps=(0.35,))
    inputs = sample_inputs(model, batch=2, seq=6)
    expected = alone_on_sliced(model, experts, inputs, ["a", None])
    with doe.unplugged(model, experts), doe.mixed_batch(model, ["a", None]):
        assert_rows(model_logits(model, inputs), expected)


def test_bad_arguments_are_rejected_before_anything_changes():
    model = make_tiny("bert")
    other = make_tiny("llama")
    experts = make_experts(model)
    snap = snapshot(model)
    foreign = make_experts(other, names=("x",), keeps=(0.35,))["x"]
    for bad, err, match in [
        ({}, ValueError, "at least one"),
        ({"a": experts["a"], "b": "not an expert"}, TypeError, "experts\\['b'\\]: expected a doe.TaskExpert"),
        ({"a": experts["a"], 3: experts["b"]}, TypeError, "task names"),
        ({"a": experts["a"], "x": foreign}, ValueError, "built for a 'llama' model"),
    ]:
        with pytest.raises(err, match=match):
            doe.unplug_(model, bad)
        assert not doe.is_unplugged(model)
        assert_same_as(model, snap)

    with pytest.raises(ValueError, match="unplug_\\(model, \\{task: expert"):
        with doe.mixed_batch(model, ["a"]):
            pass

    inputs = sample_inputs(model, batch=3, seq=5)
    expected = alone_on_sliced(model, experts, inputs, ["a", "b", None])
    doe.unplug_(model, experts)
    wrappers = gathered_wrappers(model)
    with pytest.raises(RuntimeError, match=r"BatchGroups.set\); .* doe\.mixed_batch\(model, tasks\)$"):
        model(**inputs)  # several experts and no row assignment
    for bad, err, match in [
        (["a", "zzz", None], ValueError, r"item 1: unknown task 'zzz'; installed: \['a', 'b', 'c'\]"),
        ("abc", TypeError, "one task name"),
        ([], ValueError, "at least one item"),
    ]:
        with pytest.raises(err, match=match):
            with doe.mixed_batch(model, bad):
                pass
    with pytest.raises(ValueError, match="the batch has 3 rows .* but 2 were assigned"):
        with doe.mixed_batch(model, ["a", "b"]):
            model(**inputs)
    assert gathered_wrappers(model) == wrappers
    assert all(w.mixed[1].items is None for w in wrappers)  # every assignment was cleared
    with doe.mixed_batch(model, ["a", "b", None]):  # and the model still serves
        assert_rows(model_logits(model, inputs), expected)
    doe.restore_(model)
    assert_same_as(model, snap)


def test_a_flattened_batch_of_the_wrong_size_is_refused():
    model = make_tiny("opt")
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=3, seq=5)
    doe.unplug_(model, experts)
    with pytest.raises(ValueError, match=r"the batch has 15 rows \(input \(15, 32\)\), not a multiple of the 2"):
        with doe.mixed_batch(model, ["a", "b"]):
            model(**inputs)
    doe.restore_(model)


def test_switching_between_mappings_and_single_experts_restores_exactly():
    model = make_tiny("t5-gated")
    snap = snapshot(model)
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=3, seq=5)
    expected = alone_on_sliced(model, experts, inputs, ["c", "a", None])
    doe.unplug_(model, {"a": experts["a"]})
    doe.unplug_(model, experts["b"])
    assert doe.current_expert(model) is experts["b"] and doe.installed(model).experts is None
    assert all(w.mixed is None for w in gathered_wrappers(model))
    doe.unplug_(model, experts)
    with doe.mixed_batch(model, ["c", "a", None]):
        assert_rows(model_logits(model, inputs), expected)
    doe.restore_(model)
    assert_same_as(model, snap)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_generate_gives_each_row_the_tokens_of_its_own_expert(family):
    model = make_tiny(family)
    experts = make_experts(model)
    tasks = ["a", "b", None, "c"]
    lengths = [5, 7, 3, 6]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # left padding with the pad id 0
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    sliced = {name: sliced_copy(model, e.indices).eval() for name, e in experts.items()}
    alone = [(sliced[t] if t else model).generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                                   **greedy)[0, len(p):] for p, t in zip(prompts, tasks)]
    with doe.unplugged(model, experts), doe.mixed_batch(model, tasks):
        out = model.generate(ids, attention_mask=mask, **greedy)
    for r, a in enumerate(alone):
        assert torch.equal(out[r, width:width + len(a)], a), (r, out[r, width:], a)


def test_modules_run_a_group_with_no_kept_neurons():
    # TaskExpert keeps >= 1 neuron per block; the modules take any GroupedIndices, including 0
    torch.manual_seed(0)
    up, down, gate = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 24)
    lists = [torch.tensor([1, 4, 9]), torch.empty(0, dtype=torch.long), torch.arange(24)]
    grouped = GroupedIndices(lists, 24, "cpu")
    batch = BatchGroups(3)
    block = nn.Module()
    block.gate, block.up, block.down = gate, up, down
    mlp = GatheredGatedMLP(block, gate, up, down, lists[0], activation="silu")
    pair = [GatheredLinear(up, lists[0], mode="rows"), GatheredLinear(down, lists[0], mode="cols")]
    for w in [mlp, *pair]:
        w.set_groups(grouped, batch)
    x = torch.randn(3, 2, 16)
    batch.set([1, 0, 2])
    y_pair = pair[1](torch.relu(pair[0](x)))
    y_glu = mlp(x)
    for r, idx in enumerate([lists[1], lists[0], lists[2]]):
        h = torch.relu(x[r] @ up.weight[idx].t() + up.bias[idx])
        torch.testing.assert_close(y_pair[r], h @ down.weight[:, idx].t() + down.bias, **TOL)
        g, u = x[r] @ gate.weight[idx].t() + gate.bias[idx], x[r] @ up.weight[idx].t() + up.bias[idx]
        h = torch.nn.functional.silu(g) * u
        torch.testing.assert_close(y_glu[r], h @ down.weight[:, idx].t() + down.bias, **TOL)
    torch.testing.assert_close(y_pair[0], down.bias.expand(2, 16))  # no kept neuron: the bias alone


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_carry_their_own_prompt_and_head(family):
    from doe.mixed import mixed_classify
    from doe.prompt import TaskModel
    from doe.tasks import Example, get_task
    from tiny_models import tiny_tokenizer

    model = make_tiny(family)
    experts = make_experts(model)
    specs = {t: get_task(name) for t, name in zip("abc", ("offline_sentiment", "offline_topic", "offline_question"))}
    texts = ["a good film", "rain again today in the north", "is it open", "stocks fell", "loved every minute of it"]
    tok = tiny_tokenizer(texts, [w for s in specs.values() for w in s.label_words])
    # prompts of different lengths per task; the dense rows' own prompt and head
    tms = {t: TaskModel(model, tok, spec, num_tokens=n, seed=i) for i, ((t, spec), n) in
           enumerate(zip(specs.items(), (4, 2, 6)))}
    tms[None] = TaskModel(model, tok, specs["a"], num_tokens=3, seed=9)
    tasks = ["a", None, "b", "c", "a"]
    examples = [Example(t, 0) for t in texts]
    with torch.no_grad():
        with doe.unplugged(model, experts), doe.mixed_batch(model, tasks):
            got = mixed_classify([tms[t] for t in tasks], examples)
        for r, (task, ex) in enumerate(zip(tasks, examples)):
            tm = tms[task]
            with doe.unplugged(model, experts[task]) if task else contextlib.nullcontext():
                alone = tm(**tm.encode([ex]))[0]
            assert got[r].shape == (len(tm.spec.labels),)
            torch.testing.assert_close(got[r], alone, **TOL, msg=lambda m: f"row {r} ({task}): {m}")


@pytest.mark.parametrize("names", [["a"], ["a", "b", None, "c"]])
def test_a_flattened_batch_whose_rows_divide_evenly_is_still_refused(names):
    # OPT's FFN sees (B*T, H): 1 or 4 names for 2 items of 4 tokens divide its 8 rows evenly
    model = make_tiny("opt")
    experts = make_experts(model)
    inputs = sample_inputs(model, batch=2, seq=4)
    expected = alone_on_sliced(model, experts, inputs, ["a", "b"])
    snap = snapshot(model)
    doe.unplug_(model, experts)
    with pytest.raises(ValueError, match=rf"the batch has 2 items where it entered the model, but {len(names)} were"):
        with doe.mixed_batch(model, names):
            model(**inputs)
    # the right assignment still runs, row by row as each row alone
    with doe.mixed_batch(model, ["a", "b"]):
        mixed = model_logits(model, inputs)
    assert_rows(mixed, expected)
    assert doe.is_unplugged(model) and not model._forward_pre_hooks
    doe.restore_(model)
    assert_same_as(model, snap)
