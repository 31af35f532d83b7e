"""doe.backbone: rows with soft prompts of different lengths in one forward, each read out as
it is alone. The reference runs one row at a time by hand: ``[prompt; tokens]`` embeddings,
the model, and the read-out written out in plain PyTorch."""

import pytest
import torch
import torch.nn as nn

from doe.backbone import classify, generation_inputs, pooled_text, prompted_inputs
from doe.models import model_kind
from tiny_models import HIDDEN, make_tiny

FAMILIES = ["bert", "gpt2", "llama", "opt", "t5"]  # encoders, decoders (OPT flattens its rows), seq2seq
TOL = dict(atol=1e-5, rtol=1e-5)


def _batch(model, lengths, seed=0):
    """Right-padded (B, T) ids and mask with rows of ``lengths`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        ids[r, n:] = 0
    return ids, mask


def _alone(model, prompt, ids, head, label_ids):
    """One row by hand: its real tokens after its prompt, no padding."""
    tokens = model.get_input_embeddings()(ids[None])
    embeds = tokens if prompt is None else torch.cat([prompt[None], tokens], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    p = 0 if prompt is None else prompt.shape[0]
    kind = model_kind(model)
    if kind == "encoder":
        hidden = getattr(model, "base_model", model)(inputs_embeds=embeds, attention_mask=mask)[0]
        return head(hidden[0, p:].float().mean(0))
    if kind == "seq2seq":
        dec = torch.full((1, 1), model.config.decoder_start_token_id or 0, dtype=torch.long)
        return model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits[0, 0, label_ids].float()
    return model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1, label_ids].float()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_rows_with_their_own_prompts_read_out_as_each_alone(family):
    model = make_tiny(family)
    g = torch.Generator().manual_seed(1)
    p3, p5 = torch.randn(3, HIDDEN, generator=g), torch.randn(5, HIDDEN, generator=g)
    prompts = [p3, None, p5, p3]  # shared, absent and different prompt lengths
    lengths = [6, 2, 4, 6]
    ids, mask = _batch(model, lengths)
    heads = [nn.Linear(HIDDEN, 2), nn.Linear(HIDDEN, 3)]
    row_heads = [heads[0], heads[1], heads[0], heads[1]]
    row_ids = [torch.tensor([5, 9]), torch.tensor([7, 8, 11]), torch.tensor([5, 9]), torch.tensor([12, 4, 6])]
    inputs = prompted_inputs(model, prompts, ids, mask)
    assert inputs["prompt_len"].tolist() == [3, 0, 5, 3] and inputs["text_len"].tolist() == lengths
    assert inputs["attention_mask"].sum(1).tolist() == [9, 2, 9, 9]
    encoder = model_kind(model) == "encoder"
    got = classify(model, inputs, heads=row_heads if encoder else None, label_ids=None if encoder else row_ids)
    for r in range(len(lengths)):
        want = _alone(model, prompts[r], ids[r, :lengths[r]], row_heads[r], row_ids[r])
        torch.testing.assert_close(got[r], want, **TOL, msg=lambda m: f"row {r}: {m}")


@torch.no_grad()
def test_one_prompt_for_every_row_keeps_the_batch_as_it_is():
    model = make_tiny("llama")
    prompt = torch.randn(4, HIDDEN)
    ids, mask = _batch(model, [5, 3])
    inputs = prompted_inputs(model, [prompt, prompt], ids, mask)
    want = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    torch.testing.assert_close(inputs["inputs_embeds"], want, atol=0, rtol=0)
    assert inputs["attention_mask"].tolist() == [[1] * 9, [1] * 7 + [0] * 2]


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
@torch.no_grad()
def test_pooled_text_is_the_mean_of_the_real_tokens_last_states(family):
    model = make_tiny(family)
    ids, mask = _batch(model, [6, 3])
    got = pooled_text(model, ids, mask)
    for r, n in enumerate([6, 3]):
        row = ids[r:r + 1, :n]
        ones = torch.ones_like(row)
        if family == "t5":
            hidden = model.get_encoder()(input_ids=row, attention_mask=ones)[0]
        elif family == "bert":
            hidden = model.base_model(input_ids=row, attention_mask=ones)[0]
        else:
            hidden = model(input_ids=row, attention_mask=ones, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got[r], hidden[0].float().mean(0), **TOL)


@torch.no_grad()
def test_generation_inputs_put_the_prompt_before_the_text():
    model = make_tiny("gpt2")
    ids = torch.tensor([[5, 6, 7]])
    prompt = torch.randn(2, HIDDEN, dtype=torch.float64)  # any dtype: cast to the embeddings'
    inputs = generation_inputs(model, ids, prompt)
    want = torch.cat([prompt.float()[None], model.get_input_embeddings()(ids)], dim=1)
    torch.testing.assert_close(inputs["inputs_embeds"], want, atol=0, rtol=0)
    assert inputs["attention_mask"].tolist() == [[1] * 5]
    assert generation_inputs(model, ids)["inputs_embeds"].shape == (1, 3, HIDDEN)


def test_bad_shapes_are_refused():
    model = make_tiny("gpt2")
    ids, mask = _batch(model, [3, 2])
    with pytest.raises(ValueError, match="expected one prompt per row"):
        prompted_inputs(model, [None], ids, mask)
    with pytest.raises(ValueError, match=rf"prompts\[1\]: expected shape \(n_tokens, {HIDDEN}\), got \(2, 7\)"):
        prompted_inputs(model, [None, torch.zeros(2, 7)], ids, mask)
    inputs = prompted_inputs(model, [None, None], ids, mask)
    with pytest.raises(ValueError, match="reads its rows at verbalizer tokens: expected 2 label id lists, got 1"):
        classify(model, inputs, label_ids=[torch.tensor([1])])


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_left_padding_reads_out_as_right_padding(family):
    model = make_tiny(family)
    prompt = torch.randn(3, HIDDEN)
    ids, mask = _batch(model, [6, 4])
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for r, n in enumerate([6, 4]):
        left_ids[r, ids.shape[1] - n:] = ids[r, :n]
        left_mask[r, ids.shape[1] - n:] = 1
    encoder = model_kind(model) == "encoder"
    kw = dict(heads=[nn.Linear(HIDDEN, 2)] * 2) if encoder else dict(label_ids=[torch.tensor([5, 9])] * 2)
    right = classify(model, prompted_inputs(model, [prompt, prompt], ids, mask), **kw)
    left = classify(model, prompted_inputs(model, [prompt, prompt], left_ids, left_mask), **kw)
    for a, b in zip(left, right):
        torch.testing.assert_close(a, b, **TOL)
