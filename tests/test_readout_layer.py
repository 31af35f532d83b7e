"""Heads that read an earlier layer: the states they read, the forward that stops there, the layer
chosen by cross-validated probes, attribution and localization over the layers the task reaches,
and the head fitted again on the expert. References are the models' own forwards
(``output_hidden_states``) and hand-sliced copies."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf

from doe.attribution import AttributionConfig, score_neurons
from doe.backbone import classify, layer_modules, prompted_inputs
from doe.evaluate import evaluate
from doe.expert import TaskExpert
from doe.localize import ExpertSearchConfig, LocalizationConfig, find_expert, localize
from doe.probe import choose_readout_layer, probe_head
from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
from doe.tasks import load_task
from doe.testing import sliced_copy
from tiny_models import HIDDEN, make_config, make_tiny, tiny_tokenizer

TASK = "offline_sentiment"


def deep_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    config = make_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config).eval()


def layer_calls(model):
    calls = [0] * len(layer_modules(model))
    handles = [m.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(layer_modules(model))]
    return calls, handles


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@torch.no_grad()
def test_heads_read_the_layer_they_name_as_each_row_alone_and_the_forward_stops_after_the_deepest(family):
    model = deep_llama() if family == "llama" else make_tiny(family)
    depth = len(layer_modules(model))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(3, HIDDEN, generator=g), torch.randn(2, HIDDEN, generator=g), None]
    lengths = [6, 3, 5]
    ids = torch.randint(4, model.config.vocab_size, (3, 6), generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    heads = [nn.Linear(HIDDEN, 2), nn.Linear(HIDDEN, 3), nn.Linear(HIDDEN, 2)]
    heads[0].layer, heads[1].layer = 1, depth - 1  # row 2 reads the last hidden states
    heads[1].pooling = "mean"
    got = classify(model, prompted_inputs(model, prompts, ids, mask), heads=heads)
    encoder = family == "bert"
    for r in range(3):
        tokens = model.get_input_embeddings()(ids[r: r + 1, : lengths[r]])
        embeds = tokens if prompts[r] is None else torch.cat([prompts[r][None], tokens], 1)
        run = model.base_model if encoder else model
        hidden = run(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        states = hidden[getattr(heads[r], "layer", None) or -1][0]
        text = states[0 if prompts[r] is None else prompts[r].shape[0]:]
        state = text.mean(0) if encoder or r == 1 else text[-1]
        torch.testing.assert_close(got[r], heads[r](state).float(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"row {r}: {m}")
    # rows that all read layer 1 run layer 1 only
    calls, handles = layer_calls(model)
    try:
        shallow = [heads[0], heads[0], heads[0]]
        classify(model, prompted_inputs(model, prompts, ids, mask), heads=shallow)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1] + [0] * (depth - 1)


def test_the_layer_travels_with_the_head_and_bad_layers_are_refused(tmp_path):
    data = load_task(TASK, max_train=8, max_eval=4)
    model, tok = deep_llama(), tiny_tokenizer([], data.spec.label_words)
    tm = TaskModel(model, tok, data.spec, readout="mean", readout_layer=2, num_tokens=2)
    state = tm.head_state()
    again = TaskModel(model, tok, data.spec, prompt=tm.prompt.detach(), head=state)
    assert again.readout == "mean" and again.readout_layer == 2
    batch = tm.encode(list(data.eval))
    torch.testing.assert_close(again(**batch), tm(**batch))
    expert = TaskExpert.from_indices(model, [torch.arange(10, dtype=torch.int32)] * 4, task=TASK)
    expert.prompt, expert.head = tm.prompt.detach(), state
    loaded = TaskExpert.from_pretrained(expert.save_pretrained(tmp_path / "e"))
    assert TaskModel(model, tok, data.spec, prompt=loaded.prompt, head=loaded.head).readout_layer == 2
    for layer, match in [(0, r"expected a layer in 1\.\.4 or None, got 0"), (5, "got 5"), ("2", "got '2'")]:
        with pytest.raises(ValueError, match=match):
            TaskModel(model, tok, data.spec, readout="mean", readout_layer=layer)
    with pytest.raises(ValueError, match="only a head reads an earlier layer"):
        TaskModel(model, tok, data.spec, readout="verbalizer", readout_layer=1)
    for bad in (0, -1, "first", True):
        with pytest.raises(ValueError, match="readout_layer: expected a layer number >= 1, None or 'auto'"):
            PromptTuningConfig(readout_layer=bad)


def test_the_chosen_layer_is_the_shallowest_within_the_tolerance_and_auto_tuning_reads_it():
    data = load_task(TASK, max_train=30)
    model, tok = deep_llama(), tiny_tokenizer([e.text for e in load_task(TASK, max_train=30).train])
    tm = TaskModel(model, tok, data.spec, readout="mean", num_tokens=2)
    best, accuracy = choose_readout_layer(tm, data.train, tolerance=0.0)
    assert list(accuracy) == [1, 2, 3, None] and all(0 <= a <= 1 for a in accuracy.values())
    top = max(accuracy.values())
    assert accuracy[best] == top and all(accuracy[k] < top for k in [1, 2, 3, None][: [1, 2, 3, None].index(best)])
    assert choose_readout_layer(tm, data.train, tolerance=0.99)[0] == 1
    with pytest.raises(ValueError, match="at least 2 examples"):
        choose_readout_layer(tm, data.train[:1])
    tuned = TaskModel(model, tok, data.spec, readout="mean", num_tokens=2)
    prompt_tune(tuned, data, PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, layer_tolerance=0.0))
    assert tuned.readout_layer == best and tuned.head_state()["readout_layer"].item() == best
    fixed = TaskModel(model, tok, data.spec, readout="mean", num_tokens=2)
    prompt_tune(fixed, data, PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, readout_layer=3))
    assert fixed.readout_layer == 3


def test_attribution_reaches_the_blocks_up_to_the_layer_read_and_localization_spends_the_keep_there():
    data = load_task(TASK, max_train=12)
    model, tok = deep_llama(), tiny_tokenizer([e.text for e in data.train])
    tm = TaskModel(model, tok, data.spec, readout="mean", readout_layer=2, num_tokens=2)
    examples = list(data.train)
    scores = score_neurons(tm, examples, AttributionConfig(target="log_prob", batch_size=4, show_progress=False))
    assert scores.depth == 2
    means = scores.means()
    assert all(m.abs().sum() > 0 for m in means[:2]) and all(m.abs().sum() == 0 for m in means[2:])
    # block 0 by hand: mean over real tokens of |h * d log p(gold) / dh|, the head reading layer 2's mean
    block = model.model.layers[0].mlp.down_proj
    total, count = torch.zeros(block.in_features), 0
    for e in examples:
        seen = {}
        handle = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
        try:
            ids = tm.encode([e])["input_ids"]
            embeds = torch.cat([tm.prompt.detach()[None], model.get_input_embeddings()(ids)], 1)
            states = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[2][0, 2:].mean(0)
            gold = torch.log_softmax(tm.head(states), -1)[e.label]
            (dh,) = torch.autograd.grad(gold, [seen["h"]])
        finally:
            handle.remove()
        total += (seen["h"] * dh).abs().sum((0, 1)).detach()
        count += seen["h"].shape[1]
    torch.testing.assert_close(means[0], total / count, rtol=1e-4, atol=1e-7)
    for scope in ("layer", "global"):
        expert = localize(model, scores, LocalizationConfig(keep_ratio=0.25, scope=scope))
        kept = [int(i.numel()) for i in expert.indices]
        assert kept[2:] == [1, 1] and sum(kept[:2]) == pytest.approx(0.25 * 2 * block.in_features, abs=2)
        assert expert.metadata["readout_depth"] == 2


def test_the_expert_head_is_fitted_again_on_the_expert_states_as_on_a_hand_sliced_copy():
    data = load_task(TASK, max_train=24, max_eval=8)
    model, tok = deep_llama(), tiny_tokenizer([e.text for e in data.train])
    prompt = PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, readout="mean", readout_layer=3)
    attribution = AttributionConfig(show_progress=False)
    local = LocalizationConfig(keep_ratio=0.3, bias_compensation=False)  # the sliced copy carries no offsets
    config = ExpertSearchConfig(prompt=prompt, attribution=attribution, localization=local, retune_epochs=0)
    found = find_expert(model, tok, data, config)
    expert = found.expert
    assert expert.head["readout_layer"].item() == 3
    assert expert.head["readout_layers"].tolist() == [1.0, 3.0]  # a probed head reads the first layer too
    # by hand: the dense prompt and head on a sliced copy, the head fitted there as a probe
    copy = sliced_copy(model, expert.indices)
    by_hand = TaskModel(copy, tok, data.spec, prompt=expert.dense_prompt, head=expert.dense_head)
    probe_head(by_hand, list(data.train))
    ours = TaskModel(copy, tok, data.spec, prompt=expert.prompt, head=expert.head)
    batch = by_hand.encode(list(data.eval))
    torch.testing.assert_close(F.softmax(ours(**batch), -1), F.softmax(by_hand(**batch), -1), atol=2e-3, rtol=0)
    assert not torch.equal(expert.head["weight"], expert.dense_head["weight"])
    kept = find_expert(model, tok, data, ExpertSearchConfig(prompt=prompt, attribution=attribution,
                                                            localization=local, retune_epochs=0, reprobe=False),
                       task_model=found.task_model, scores=found.scores).expert
    assert torch.equal(kept.head["weight"], kept.dense_head["weight"])


def test_eval_reports_the_layers_each_row_runs_and_the_keep_within_them():
    data = load_task(TASK, max_train=12, max_eval=6)
    model, tok = deep_llama(), tiny_tokenizer([e.text for e in data.train])
    tm = TaskModel(model, tok, data.spec, readout="mean", readout_layer=2, num_tokens=2)
    scores = score_neurons(tm, list(data.train), AttributionConfig(batch_size=4, show_progress=False))
    expert = localize(model, scores, LocalizationConfig(keep_ratio=0.25, bias_compensation=False))
    report = evaluate(model, tok, data, tm, [expert], batch_size=4)
    dense, row = report.rows
    width = model.config.intermediate_size
    kept = [int(i.numel()) for i in expert.indices]
    assert (dense.layers, dense.keep_ratio) == (2, 1.0)
    assert row.layers == 2 and row.keep_ratio == pytest.approx(sum(kept[:2]) / (2 * width))
    assert row.keep_ratio > expert.keep_ratio  # the blocks after layer 2 keep one neuron each and never run
    assert f"| {row.name} | 2 | {row.keep_ratio:.2f} |" in report.to_markdown()
