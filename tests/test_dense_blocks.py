"""Blocks an expert keeps whole: the budget the others share, the sensitivity that picks them
(against hand-sliced copies pruned one block at a time) and the rule that turns it into blocks."""

import pytest
import torch

from doe.attribution import AttributionConfig, NeuronScores, score_neurons
from doe.localize import (ExpertSearchConfig, LocalizationConfig, _sensitive_blocks, block_sensitivity, find_expert,
                          localize)
from doe.prompt import PromptTuningConfig, TaskModel
from doe.architectures import find_ffn_blocks
from doe.tasks import generation_task, load_task
from doe.testing import sliced_copy
from test_readout_layer import deep_llama, layer_calls
from tiny_models import make_tiny, tiny_tokenizer

TASK = "offline_sentiment"


def random_scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = model.config.intermediate_size
    layers = model.config.num_hidden_layers
    return NeuronScores([torch.rand(n, generator=g) * (i + 1) for i in range(layers)], [1.0] * layers, "attribution")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_dense_blocks_are_kept_whole_and_the_others_share_the_rest_of_the_keep(scope):
    model = deep_llama()
    scores = random_scores(model)
    n = model.config.intermediate_size
    expert = localize(model, scores, LocalizationConfig(keep_ratio=0.4, scope=scope, dense_blocks=(1,),
                                                        bias_compensation=False))
    kept = expert.kept
    assert kept[1] == n and sum(kept) == pytest.approx(0.4 * 4 * n, abs=3)
    if scope == "layer":  # the rest share 0.4 * 4n - n evenly
        assert kept[0] == kept[2] == kept[3] == -(-(0.4 * 4 * n - n) // 3)
    for m, idx in zip(scores.means(), expert.indices):
        assert set(idx.tolist()) == set(torch.topk(m, idx.numel()).indices.tolist())


def test_bad_dense_blocks_are_refused_with_what_was_expected():
    model = deep_llama()
    scores = random_scores(model)
    with pytest.raises(ValueError, match="below 4"):
        localize(model, scores, LocalizationConfig(dense_blocks=(7,)))
    plain = localize(model, scores, LocalizationConfig(dense_blocks="auto"))  # no task to measure: none whole
    none = localize(model, scores, LocalizationConfig(dense_blocks=()))
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, none.indices))
    with pytest.raises(ValueError, match=r"leaves 0 after the dense blocks \[0\]"):
        localize(model, scores, LocalizationConfig(keep_ratio=0.2, dense_blocks=(0,)))
    for bad in [(1, 1), ("a",), (-1,), "all", 0]:
        with pytest.raises(ValueError, match="dense_blocks: expected 'auto' or distinct block numbers"):
            LocalizationConfig(dense_blocks=bad)
    with pytest.raises(ValueError, match="sensitivity_factor"):
        LocalizationConfig(sensitivity_factor=0)


def test_the_rule_keeps_outliers_whole_while_the_keep_leaves_the_others_a_quarter_of_their_share():
    sizes = [100] * 4
    rises = [5.0, 0.1, 0.2, 0.15]
    assert _sensitive_blocks(rises, LocalizationConfig(keep_ratio=0.5), sizes) == (0,)
    assert _sensitive_blocks(rises, LocalizationConfig(keep_ratio=0.4), sizes) == (0,)  # 60 left for 300: a half
    assert _sensitive_blocks(rises, LocalizationConfig(keep_ratio=0.3), sizes) == ()  # 20 left for 300
    assert _sensitive_blocks(rises, LocalizationConfig(keep_ratio=0.5, sensitivity_factor=40), sizes) == ()
    assert _sensitive_blocks([0.0] * 4, LocalizationConfig(), sizes) == ()


def _sensitivity_case(family, tmp_path):
    """(task model, examples) of a family: a llama head over layers 1 and 3 of 4, a llama
    generation task, a gpt2 head on the last token, bert, and t5 (verbalizers)."""
    if family == "llama-generation":
        from test_generation_tasks import WORDS, write_copy_task

        data = load_task(generation_task("copy", write_copy_task(tmp_path, n=12), prompt_field="question",
                                         completion_field="answer", holdout=0.25))
        tok = tiny_tokenizer(["copy " + " ".join(WORDS)])
        return TaskModel(deep_llama(), tok, data.spec, num_tokens=2), list(data.train)
    data = load_task(TASK, max_train=12)
    tok = tiny_tokenizer([e.text for e in data.train], data.spec.label_words)
    if family == "llama":
        return TaskModel(deep_llama(), tok, data.spec, readout="mean", readout_layers=(1, 3), num_tokens=2), \
            list(data.train)
    readout = {"gpt2": "head", "bert": None, "t5": None}[family]
    return TaskModel(make_tiny(family), tok, data.spec, readout=readout, num_tokens=2), list(data.train)


@pytest.mark.parametrize("family", ["llama", "llama-generation", "gpt2", "bert", "t5"])
@torch.no_grad()
def test_block_sensitivity_is_the_loss_rise_of_a_copy_sliced_in_that_block_alone(family, tmp_path):
    tm, examples = _sensitivity_case(family, tmp_path)
    model = tm.model
    g = torch.Generator().manual_seed(0)
    n = [b.num_neurons for b in find_ffn_blocks(model)]
    scores = NeuronScores([torch.rand(k, generator=g) for k in n], [1.0] * len(n), "attribution")
    expert = localize(model, scores, LocalizationConfig(keep_ratio=0.6, scope="layer", dense_blocks=(1,),
                                                        bias_compensation=False))
    calls, handles = layer_calls(model) if family != "t5" else ([], [])
    try:
        rises = block_sensitivity(tm, expert, examples, batch_size=5)
    finally:
        for h in handles:
            h.remove()
    batches = [examples[i: i + 5] for i in range(0, len(examples), 5)]

    def loss(task_model):  # the mean over the examples, batch by batch as block_sensitivity's
        return sum(float(task_model.loss(b)) * len(b) for b in batches) / len(examples)

    dense = loss(tm)
    depth = 3 if family == "llama" else len(n)  # the llama head reads layers 1 and 3 of 4
    whole = [torch.arange(k) for k in expert.num_neurons]
    for i in range(len(n)):
        if i == 1 or i >= depth:  # kept whole; after the deepest layer the head reads
            assert rises[i] == 0.0
            continue
        copy = sliced_copy(model, whole[:i] + [expert.indices[i]] + whole[i + 1:])
        by_hand = TaskModel(copy, tm.tokenizer, tm.spec, prompt=tm.prompt.detach(), head=tm.head_state())
        assert rises[i] == pytest.approx(loss(by_hand) - dense, abs=1e-5), f"block {i}"
        assert rises[i] != 0.0
    if family == "llama":  # layer j runs in the dense pass and in the passes of blocks 0 and 2 up to it
        assert calls == [2 * len(batches), 2 * len(batches), 3 * len(batches), 0]


def test_find_expert_keeps_the_blocks_the_rule_picks_from_the_measured_sensitivity():
    data = load_task(TASK, max_train=16, max_eval=4)
    model, tok = deep_llama(), tiny_tokenizer([e.text for e in data.train])
    prompt = PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, readout="mean", readout_layer=None)
    local = LocalizationConfig(keep_ratio=0.5, sensitivity_factor=0.2, bias_compensation=False)
    config = ExpertSearchConfig(prompt=prompt, attribution=AttributionConfig(show_progress=False),
                                localization=local, retune_epochs=0, sensitivity_examples=8)
    found = find_expert(model, tok, data, config)
    first = localize(model, found.scores, LocalizationConfig(keep_ratio=0.5, dense_blocks=()))
    rises = block_sensitivity(found.task_model, first, list(data.train)[:8], config.attribution.batch_size)
    assert found.expert.metadata["block_sensitivity"] == [round(r, 4) for r in rises]
    chosen = _sensitive_blocks(rises, local, first.num_neurons)
    assert chosen and tuple(found.expert.metadata["localization"]["dense_blocks"]) == chosen
    assert all(found.expert.kept[b] == found.expert.num_neurons[b] for b in chosen)
    assert sum(found.expert.kept) == pytest.approx(0.5 * sum(found.expert.num_neurons), abs=4)


@torch.no_grad()
def test_a_layer_replay_answers_as_the_layers_and_always_puts_them_back():
    from doe.backbone import LayerReplay, layer_modules

    model = deep_llama()
    stack = layer_modules(model)
    originals = list(stack)
    ids = torch.randint(4, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    replay = LayerReplay(model, 2)
    with replay.recording():
        plain = model(ids).logits
    with replay.skipping(2):
        assert stack[0] is not originals[0] and stack[0].mlp is originals[0].mlp  # the layer's attributes
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
    assert list(stack) == originals
    with pytest.raises(KeyError), replay.skipping(1):
        raise KeyError("the body failed")
    assert list(stack) == originals
    with pytest.raises(RuntimeError, match="2 forwards asked for the 1 recorded"), replay.skipping(2):
        model(ids)
        model(ids)
    assert list(stack) == originals
    with pytest.raises(RuntimeError, match=r"layers \[0\] answered 0 forwards, 1 were recorded"), replay.skipping(1):
        pass
    with pytest.raises(ValueError, match="expected 0..2 layers, got 3"):
        with replay.skipping(3):
            pass
