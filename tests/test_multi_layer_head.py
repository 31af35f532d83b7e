"""Heads that read several layers' states side by side: what they read against the models' own
forwards (``output_hidden_states``), the layers travelling with the head, the refusals, and the
first layer a probed head reads next to the chosen one."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from doe.backbone import classify, prompted_inputs
from doe.expert import TaskExpert
from doe.probe import probe_head
from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
from doe.tasks import load_task
from test_readout_layer import deep_llama, layer_calls
from tiny_models import HIDDEN, make_tiny, tiny_tokenizer

TASK = "offline_sentiment"


def _hand_states(model, prompt, ids, layers, mean: bool, encoder: bool = False) -> torch.Tensor:
    """(len(layers) * H,): one text's states at ``layers`` (None: the last hidden states), pooled
    over the text, side by side; from the model's own forward."""
    tokens = model.get_input_embeddings()(ids)
    embeds = tokens if prompt is None else torch.cat([prompt[None], tokens], 1)
    run = model.base_model if encoder else model
    hidden = run(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    start = 0 if prompt is None else prompt.shape[0]
    parts = [hidden[-1 if k is None else k][0, start:] for k in layers]
    return torch.cat([p.mean(0) if mean else p[-1] for p in parts])


@pytest.mark.parametrize("family", ["llama", "bert"])
@torch.no_grad()
def test_heads_over_several_layers_read_them_side_by_side_as_each_row_alone(family):
    model = deep_llama() if family == "llama" else make_tiny(family)
    encoder = family == "bert"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(3, HIDDEN, generator=g), None, torch.randn(2, HIDDEN, generator=g)]
    lengths = [6, 4, 5]
    ids = torch.randint(4, model.config.vocab_size, (3, 6), generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    reads = [(1, 2), (2, None), (1,)]
    heads = [nn.Linear(len(r) * HIDDEN, 2 + i) for i, r in enumerate(reads)]
    for head, layers in zip(heads, reads):
        head.layers = layers
    heads[0].pooling = "mean"
    got = classify(model, prompted_inputs(model, prompts, ids, mask), heads=heads)
    for r in range(3):
        state = _hand_states(model, prompts[r], ids[r: r + 1, : lengths[r]], reads[r], encoder or r == 0, encoder)
        torch.testing.assert_close(got[r], heads[r](state).float(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"row {r}: {m}")
    # rows that read layers 1 and 2 run those two only
    calls, handles = layer_calls(model)
    try:
        classify(model, prompted_inputs(model, prompts, ids, mask), heads=[heads[0]] * 3)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1] + [0] * (len(calls) - 2)


def test_the_layers_travel_with_the_head_and_bad_ones_are_refused(tmp_path):
    data = load_task(TASK, max_train=8, max_eval=4)
    model, tok = deep_llama(), tiny_tokenizer([], data.spec.label_words)
    tm = TaskModel(model, tok, data.spec, readout="mean", readout_layers=(1, 3), num_tokens=2)
    assert tuple(tm.head.weight.shape) == (2, 2 * HIDDEN) and tm.readout_layer == 3
    state = tm.head_state()
    assert state["readout_layers"].tolist() == [1.0, 3.0] and state["readout_layer"].item() == 3
    batch = tm.encode(list(data.eval))
    expert = TaskExpert.from_indices(model, [torch.arange(10, dtype=torch.int32)] * 4, task=TASK)
    expert.prompt, expert.head = tm.prompt.detach(), state
    loaded = TaskExpert.from_pretrained(expert.save_pretrained(tmp_path / "e"))
    again = TaskModel(model, tok, data.spec, prompt=loaded.prompt, head=loaded.head)
    assert again.readout_layers == (1, 3)
    torch.testing.assert_close(again(**batch), tm(**batch))
    last = TaskModel(model, tok, data.spec, readout="head", readout_layers=(2, None), num_tokens=2)
    assert TaskModel(model, tok, data.spec, prompt=last.prompt.detach(), head=last.head_state()).readout_layers \
        == (2, None)
    for layers, match in [((1, 1), "distinct layers"), ((1, 5), r"expected a layer in 1\.\.4 or None, got 5"),
                          ((0, 2), "got 0")]:
        with pytest.raises(ValueError, match=match):
            TaskModel(model, tok, data.spec, readout="mean", readout_layers=layers)
    with pytest.raises(ValueError, match="only a head reads an earlier layer"):
        TaskModel(model, tok, data.spec, readout="verbalizer", readout_layers=(1, 2))
    fitted = dict(state, readout_layers=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"expected a weight of shape \(2, 96\).*got \(2, 64\)"):
        TaskModel(model, tok, data.spec, prompt=tm.prompt.detach(), head=fitted)
    with pytest.raises(ValueError, match=r"fitted on 2 layer\(s\) of states, not 1"):
        again.readout_layer = 2
    assert again.readout_layers == (1, 3)  # the refused change left the head as it was
    with pytest.raises(ValueError, match="readout_first: expected True, False or 'auto', got 'yes'"):
        PromptTuningConfig(readout_first="yes")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_new_head_reads_the_first_layer_next_to_the_chosen_one_where_it_starts_as_a_probe(family):
    data = load_task(TASK, max_train=12)
    tok = tiny_tokenizer([e.text for e in data.train])
    model = deep_llama() if family == "llama" else make_tiny(family)
    first = {}
    for setting in ("auto", True, False):
        tm = TaskModel(model, tok, data.spec, readout="mean", num_tokens=2)
        prompt_tune(tm, data, PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, readout="mean",
                                                 readout_layer=3 if family == "llama" else None,
                                                 readout_first=setting))
        first[setting] = tm.readout_layers
    deepest = 3 if family == "llama" else None
    probed = family == "llama"  # decoder heads start as probes, encoder heads at random
    assert first == {"auto": (1, deepest) if probed else (deepest,), True: (1, deepest), False: (deepest,)}
    tm = TaskModel(model, tok, data.spec, readout="mean", num_tokens=2)
    prompt_tune(tm, data, PromptTuningConfig(epochs=1, num_tokens=2, show_progress=False, readout="mean",
                                             readout_layer=1, readout_first=True))
    assert tm.readout_layers == (1,)


@torch.no_grad()
def test_a_probe_over_two_layers_is_the_logistic_regression_of_both_states_side_by_side():
    data = load_task(TASK, max_train=24)
    tok = tiny_tokenizer([e.text for e in data.train])
    model = deep_llama()
    tm = TaskModel(model, tok, data.spec, readout="mean", readout_layers=(1, 3), num_tokens=3)
    examples = list(data.train)
    probe_head(tm, examples, batch_size=8)
    x = torch.stack([_hand_states(model, tm.prompt, tm.encode([e])["input_ids"], (1, 3), True)
                     for e in examples]).float()
    y = torch.tensor([e.label for e in examples])
    mu, sd = x.mean(0), x.std(0)
    with torch.enable_grad():
        w = (tm.head.weight.detach().t() * sd[:, None]).requires_grad_()  # back in the standardized space
        b = (tm.head.bias.detach() + mu @ tm.head.weight.detach().t()).requires_grad_()
        loss = F.cross_entropy((x - mu) / sd @ w + b, y) + 1e-2 * w.pow(2).sum()
        loss.backward()
    assert w.shape[0] == 2 * HIDDEN
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3  # the optimum
