"""Classification on decoders: a head on the last text token (or verbalizer tokens), the task's
instruction in the chat template, the zero-shot row. References are written out in plain PyTorch
on the model's own forward (``output_hidden_states``, ``logits``)."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from doe.backbone import classify, prompted_inputs
from doe.cli import main
from doe.evaluate import evaluate
from doe.prompt import TaskModel
from doe.tasks import Example, TaskData, TaskSpec, compute_metric, load_task
from tiny_models import HIDDEN, make_tiny, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}[CLS] {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}answer{% endif %}")
SPEC = TaskSpec("toy", ("neg", "pos"), verbalizer=("bad", "good"))
TASK = "offline_sentiment"


def chat_tokenizer(texts=(), words=()):
    tok = tiny_tokenizer(texts, ("answer", "classify", "this", *words))
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])  # OPT flattens its rows before the FFN
@torch.no_grad()
def test_decoder_rows_read_through_heads_or_verbalizers_as_each_alone(family):
    model = make_tiny(family)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(3, HIDDEN, generator=g), None, torch.randn(5, HIDDEN, generator=g), None]
    lengths = [6, 2, 4, 5]
    ids = torch.randint(4, model.config.vocab_size, (4, 6), generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    head_a, head_b = nn.Linear(HIDDEN, 2), nn.Linear(HIDDEN, 4)
    heads = [head_a, None, head_b, None]
    label_ids = [None, torch.tensor([5, 9, 7]), None, torch.tensor([11, 4])]
    got = classify(model, prompted_inputs(model, prompts, ids, mask), heads=heads, label_ids=label_ids)
    for r in range(4):
        tokens = model.get_input_embeddings()(ids[r : r + 1, : lengths[r]])
        embeds = tokens if prompts[r] is None else torch.cat([prompts[r][None], tokens], 1)
        out = model(inputs_embeds=embeds, output_hidden_states=True)
        want = heads[r](out.hidden_states[-1][0, -1]) if heads[r] is not None else out.logits[0, -1, label_ids[r]]
        torch.testing.assert_close(got[r], want.float(), atol=1e-5, rtol=1e-5, msg=lambda m: f"row {r}: {m}")


@torch.no_grad()
def test_mean_heads_read_the_mean_of_the_text_next_to_last_token_heads_and_round_trip(tmp_path):
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(3, HIDDEN, generator=g), torch.randn(2, HIDDEN, generator=g)]
    lengths = [6, 3]
    ids = torch.randint(4, model.config.vocab_size, (2, 6), generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    mean_head, last_head = nn.Linear(HIDDEN, 2), nn.Linear(HIDDEN, 3)
    mean_head.pooling = "mean"
    got = classify(model, prompted_inputs(model, prompts, ids, mask), heads=[mean_head, last_head])
    for r, head in enumerate([mean_head, last_head]):
        tokens = model.get_input_embeddings()(ids[r : r + 1, : lengths[r]])
        hidden = model(inputs_embeds=torch.cat([prompts[r][None], tokens], 1), output_hidden_states=True
                       ).hidden_states[-1][0]
        state = hidden[prompts[r].shape[0]:].mean(0) if r == 0 else hidden[-1]  # the text's positions only
        torch.testing.assert_close(got[r], head(state).float(), atol=1e-5, rtol=1e-5)
    # the head state marks a mean head, so a TaskModel (and an expert file) reads it back the same way
    tok = tiny_tokenizer([], SPEC.label_words)
    tm = TaskModel(model, tok, SPEC, readout="mean")
    state = tm.head_state()
    again = TaskModel(model, tok, SPEC, prompt=tm.prompt.detach(), head=state)
    assert again.readout == "mean" and again.head.pooling == "mean"
    batch = tm.encode([Example("a b c", 0), Example("d", 1)])
    torch.testing.assert_close(again(**batch), tm(**batch))
    assert TaskModel(make_tiny("bert"), tok, SPEC, readout="mean").readout == "head"  # encoders read the mean


def test_readout_defaults_and_refusals():
    tok = tiny_tokenizer([], SPEC.label_words)
    llama = make_tiny("llama")
    assert TaskModel(llama, tok, SPEC).readout == "mean"  # a new decoder prompt gets a head on the mean
    old = TaskModel(llama, tok, SPEC, prompt=torch.zeros(2, HIDDEN))  # a prompt tuned with verbalizers
    assert old.readout == "verbalizer" and old.head is None and old.label_token_ids.numel() == 2
    with_head = TaskModel(llama, tok, SPEC, prompt=torch.zeros(2, HIDDEN),
                          head={"weight": torch.zeros(2, HIDDEN), "bias": torch.ones(2)})
    assert with_head.readout == "head" and torch.equal(with_head.head.bias, torch.ones(2))
    assert TaskModel(make_tiny("t5"), tok, SPEC).readout == "verbalizer"
    for model, readout, kw, match in [
        (make_tiny("bert"), "verbalizer", {}, "does not apply to encoder models"),
        (make_tiny("t5"), "head", {}, "does not apply to seq2seq models"),
        (llama, "verbalizer", {"head": {"weight": torch.zeros(2, HIDDEN), "bias": torch.zeros(2)}}, "one or the other"),
        (llama, "logits", {}, "expected one of auto, head, mean, verbalizer, got 'logits'"),
    ]:
        with pytest.raises(ValueError, match=match):
            TaskModel(model, tok, SPEC, readout=readout, **kw)


def test_the_instruction_goes_in_the_chat_template_and_only_the_text_is_cut():
    tok = chat_tokenizer(["one two three four five six"], SPEC.label_words)
    spec = TaskSpec("toy", ("neg", "pos"), verbalizer=("bad", "good"), instruction="classify this")
    tm = TaskModel(make_tiny("llama"), tok, spec, max_length=4)
    batch = tm.encode([Example("one two three four five six", 0), Example("two", 1)])
    rendered = [tok.apply_chat_template([{"role": "user", "content": f"classify this\n\n{t}"}], tokenize=False,
                                        add_generation_prompt=True) for t in ("one two three four", "two")]
    want = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
    assert batch["attention_mask"].sum(1).tolist() == [len(w) for w in want]
    for r, w in enumerate(want):
        assert batch["input_ids"][r, : len(w)].tolist() == w
    assert batch["input_ids"][1, len(want[1]):].eq(tok.pad_token_id).all()

    plain = tiny_tokenizer(["one two"], ("classify", "this"))  # no chat template: a first paragraph
    tm = TaskModel(make_tiny("gpt2"), plain, spec)
    assert tm.encode([Example("one two", 0)])["input_ids"][0].tolist() == plain("classify this\n\none two")["input_ids"]


@torch.no_grad()
def test_zero_shot_row_reads_the_label_words_after_the_instruction():
    data = load_task(TASK, max_train=8, max_eval=12)
    spec = TaskSpec(TASK, data.spec.labels, verbalizer=data.spec.label_words, instruction="classify this")
    data = TaskData(spec, data.train, data.eval)
    tok = chat_tokenizer([e.text for e in data.eval], spec.label_words)
    model = make_tiny("llama")
    dense = TaskModel(model, tok, spec, num_tokens=2)
    report = evaluate(model, tok, data, dense, zero_shot=True, batch_size=4)
    assert [r.name for r in report.rows] == ["dense", "zero-shot"]
    preds = []
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in spec.label_words]
    for e in data.eval:  # by hand: the rendered chat turn, the model's logits at its last token
        text = tok.apply_chat_template([{"role": "user", "content": f"classify this\n\n{e.text}"}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False, truncation=True, max_length=64)["input_ids"]])
        preds.append(int(model(input_ids=ids).logits[0, -1, words].argmax()))
    assert report.row("zero-shot").metric == compute_metric("accuracy", preds, [e.label for e in data.eval])
    assert not any(r.name == "zero-shot" for r in evaluate(make_tiny("bert"), tok, data, TaskModel(
        make_tiny("bert"), tok, spec, num_tokens=2), zero_shot=True, batch_size=4).rows)  # encoders: no row


def test_localize_and_eval_commands_take_the_instruction_and_the_readout(tmp_path, capsys):
    data = load_task(TASK, max_train=16, max_eval=8)
    folder = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    chat_tokenizer([e.text for e in data.train], data.spec.label_words).save_pretrained(folder)
    common = ["--model", str(folder), "--task", TASK, "--max-train", "16", "--max-eval", "8", "--epochs", "1",
              "--retune-epochs", "0", "--prompt-tokens", "2", "--quiet"]
    for readout in ("head", "verbalizer"):
        out = tmp_path / readout
        assert main(["localize", *common, "--out", str(out), "--readout", readout,
                     "--instruction", "classify this"]) == 0
        config = json.loads((out / "expert_config.json").read_text())
        assert config["metadata"]["task_spec"]["instruction"] == "classify this"
        assert bool(config["head_keys"]) == (readout == "head")
    capsys.readouterr()
    assert main(["eval", "--experts", str(tmp_path / "head"), "--max-eval", "8", "--json", "--quiet"]) == 0
    rows = [r["name"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert rows[:2] == ["dense", "zero-shot"] and len(rows) == 3


def test_probe_head_is_the_penalized_logistic_regression_of_the_states_it_reads():
    from doe.probe import probe_head

    data = load_task(TASK, max_train=24)
    tok = tiny_tokenizer([e.text for e in data.train])
    model = make_tiny("llama")
    tm = TaskModel(model, tok, data.spec, readout="mean", num_tokens=3)
    examples = list(data.train)
    probe_head(tm, examples, batch_size=8)
    with torch.no_grad():  # the states by hand: the mean over the text of the last hidden states
        states = []
        for e in examples:
            ids = tm.encode([e])["input_ids"]
            embeds = torch.cat([tm.prompt[None], model.get_input_embeddings()(ids)], 1)
            states.append(model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0, 3:].mean(0))
    x = torch.stack(states).float()
    y = torch.tensor([e.label for e in examples])
    mu, sd = x.mean(0), x.std(0)
    w = (tm.head.weight.detach().t() * sd[:, None]).requires_grad_()  # back in the standardized space
    b = (tm.head.bias.detach() + mu @ tm.head.weight.detach().t()).requires_grad_()
    loss = F.cross_entropy((x - mu) / sd @ w + b, y) + 1e-2 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3  # the optimum
    assert not tm.fresh_head
