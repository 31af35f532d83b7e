"""Prompt tuning, neuron scoring and the find_expert pipeline on tiny random models.

References: attribution is recomputed here with a different mechanism (one layer at a time,
the down projection's input replaced by a leaf tensor), and skill predictivity against a
planted neuron; the backbone must come out of prompt tuning bit-identical.
"""

import os

import pytest
import torch

import doe
from doe.attribution import AttributionConfig, NeuronScores, _skill_scores, score_neurons
from doe.evaluate import evaluate
from doe.localize import ExpertSearchConfig, LocalizationConfig, find_expert
from doe.models import model_kind
from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
from doe.tasks import load_task
from doe_kernels.testing import random_indices
from tiny_models import make_tiny, tiny_tokenizer

QUIET = dict(show_progress=False)


@pytest.fixture(scope="module")
def sentiment():
    return load_task("offline_sentiment", max_train=48, max_eval=24)


@pytest.fixture(scope="module")
def tokenizer(sentiment):
    return tiny_tokenizer([e.text for e in sentiment.train], sentiment.spec.label_words)


def _backbone_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_loss(tm, examples):
    with torch.no_grad():
        logits = tm(**tm.encode(examples))
    return torch.nn.functional.cross_entropy(logits, torch.tensor([e.label for e in examples])).item()


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "t5-gated"])
def test_prompt_tuning_trains_only_prompt_and_head(family, sentiment, tokenizer):
    model = make_tiny(family)
    before = _backbone_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tm = TaskModel(model, tokenizer, sentiment.spec, num_tokens=4)
    assert tm.kind == model_kind(model) and (tm.head is not None) == (tm.kind != "seq2seq")  # decoders: a head
    prompt0 = tm.prompt.detach().clone()
    loss0 = _train_loss(tm, sentiment.train)
    result = prompt_tune(tm, sentiment, PromptTuningConfig(epochs=4, batch_size=16, lr=5e-2, head_lr=1e-2, **QUIET))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not torch.equal(result.prompt, prompt0)
    assert _train_loss(tm, sentiment.train) < loss0
    logits = tm(**tm.encode(sentiment.eval[:5]))
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()


def test_retuning_on_an_expert_flows_through_the_gathered_ffn(sentiment, tokenizer):
    model = make_tiny("llama")
    before = _backbone_copy(model)
    tm = TaskModel(model, tokenizer, sentiment.spec, num_tokens=4)
    g = torch.Generator().manual_seed(0)
    expert = doe.TaskExpert.from_indices(model, [random_indices(b.num_neurons, 30, generator=g)
                                                 for b in doe.find_ffn_blocks(model)])
    prompt0 = tm.prompt.detach().clone()
    with doe.unplugged(model, expert):
        prompt_tune(tm, sentiment, PromptTuningConfig(epochs=1, **QUIET))
    assert not torch.equal(tm.prompt.detach(), prompt0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _leaf_reference(tm, examples, method, target="logit"):
    """Per block: mean over real tokens of |h*dh|, |dh| or |h|, one layer at a time."""
    blocks = doe.find_ffn_blocks(tm.model)
    enc = tm.encode(examples)
    labels = torch.tensor([e.label for e in examples])
    mask = torch.cat([torch.ones(len(examples), tm.prompt.shape[0]), enc["attention_mask"].float()], 1)
    out = []
    for block in blocks:
        store = {}

        def hook(module, args):
            leaf = args[0].detach().requires_grad_()
            store["h"] = leaf
            return (leaf,)

        handle = block.down.register_forward_pre_hook(hook)
        try:
            logits = tm(**enc)
            if target == "log_prob":
                logits = torch.log_softmax(logits, dim=-1)
            logits.gather(1, labels[:, None]).sum().backward()
        finally:
            handle.remove()
        h, dh = store["h"].detach(), store["h"].grad
        value = {"attribution": h * dh, "gradient": dh, "activation": h}[method].abs()
        out.append((value * mask[..., None]).sum((0, 1)) / mask.sum())
    return out


@pytest.mark.parametrize("method, target", [("attribution", "logit"), ("attribution", "log_prob"),
                                            ("gradient", "logit"), ("activation", "logit")])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_scores_match_a_layer_by_layer_reference(family, method, target, sentiment, tokenizer):
    model = make_tiny(family)
    tm = TaskModel(model, tokenizer, sentiment.spec, num_tokens=3)
    examples = sentiment.train[:6]
    scores = score_neurons(tm, examples, AttributionConfig(method=method, target=target, batch_size=4, **QUIET))
    ref = _leaf_reference(tm, examples, method, target)
    for got, want in zip(scores.means(), ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert all(p.requires_grad for p in tm.trainable_parameters())  # flags put back


def test_integrated_gradients_with_one_step_is_attribution(sentiment, tokenizer):
    tm = TaskModel(make_tiny("bert"), tokenizer, sentiment.spec, num_tokens=3)
    ig = score_neurons(tm, sentiment.train[:5], AttributionConfig(method="integrated_gradients", ig_steps=1, **QUIET))
    at = score_neurons(tm, sentiment.train[:5], AttributionConfig(method="attribution", **QUIET))
    for a, b in zip(ig.means(), at.means()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_skill_predictivity_finds_a_planted_neuron():
    g = torch.Generator().manual_seed(0)
    labels = [0, 1] * 20
    acts = torch.rand(40, 5, generator=g)
    acts[:, 2] = torch.tensor(labels, dtype=torch.float32) * 2 - 1  # fires exactly on label 1
    acts[:, 4] = -acts[:, 2]  # anti-correlated is just as predictive
    scores = _skill_scores([[acts[:20], acts[20:]]], labels, 2).means()[0]
    assert scores[2] == 1.0 and scores[4] == 1.0
    assert scores[[0, 1, 3]].max() < 0.9


def test_scores_add_as_shards(sentiment, tokenizer):
    tm = TaskModel(make_tiny("gpt2"), tokenizer, sentiment.spec, num_tokens=2)
    cfg = AttributionConfig(batch_size=4, **QUIET)
    whole = score_neurons(tm, sentiment.train[:8], cfg)
    parts = score_neurons(tm, sentiment.train[:4], cfg) + score_neurons(tm, sentiment.train[4:8], cfg)
    for a, b in zip(whole.sums, parts.sums):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert whole.counts == parts.counts


def _distributed_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = load_task("offline_sentiment", max_train=48)
        tok = tiny_tokenizer([e.text for e in data.train], data.spec.label_words)
        tm = TaskModel(make_tiny("bert"), tok, data.spec, num_tokens=2)
        shard = data.train[rank * 4 : rank * 4 + 4]
        scores = score_neurons(tm, shard, AttributionConfig(batch_size=4, show_progress=False))
        torch.save({"sums": scores.sums, "counts": scores.counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_scores_all_reduce_over_ranks(tmp_path, sentiment, tokenizer):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # The same model, tokenizer and data as the workers, scored on both shards in one process.
    tm = TaskModel(make_tiny("bert"), tokenizer, sentiment.spec, num_tokens=2)
    whole = score_neurons(tm, sentiment.train[:8], AttributionConfig(batch_size=4, **QUIET))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["counts"] == whole.counts
        for a, b in zip(got["sums"], whole.sums):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_random_scores_are_seeded(sentiment, tokenizer):
    tm = TaskModel(make_tiny("bert"), tokenizer, sentiment.spec)
    cfg = AttributionConfig(method="random", seed=3, **QUIET)
    s1, s2 = score_neurons(tm, sentiment.train[:4], cfg), score_neurons(tm, sentiment.train[:4], cfg)
    s3 = score_neurons(tm, sentiment.train[:4], AttributionConfig(method="random", seed=4, **QUIET))
    assert all(torch.equal(x, y) for x, y in zip(s1.sums, s2.sums))
    assert not torch.equal(s1.sums[0], s3.sums[0])


def test_find_expert_end_to_end(sentiment, tokenizer, tmp_path):
    model = make_tiny("bert")
    config = ExpertSearchConfig(
        prompt=PromptTuningConfig(num_tokens=4, epochs=2, **QUIET),
        attribution=AttributionConfig(**QUIET),
        localization=LocalizationConfig(keep_ratio=0.35, scope="layer"),
        retune_epochs=1,
    )
    result = find_expert(model, tokenizer, sentiment, config)
    expert = result.expert
    n = doe.find_ffn_blocks(model)[0].num_neurons
    assert expert.task == "offline_sentiment" and expert.kept == [-(-35 * n // 100)] * 2
    assert expert.prompt.shape == (4, 32) and set(expert.head) == {"weight", "bias"}
    assert torch.equal(expert.dense_prompt, result.task_model.prompt.detach())  # the tuned dense prompt
    assert not torch.equal(expert.prompt, expert.dense_prompt)  # re-tuned on the expert
    assert expert.metadata["method"] == "attribution"
    for block_scores, idx in zip(result.scores.means(), expert.indices):
        assert set(idx.tolist()) == set(torch.topk(block_scores, idx.numel()).indices.tolist())
    loaded = doe.TaskExpert.from_pretrained(expert.save_pretrained(tmp_path / "expert"))
    report = evaluate(model, tokenizer, sentiment, result.task_model, [loaded], batch_size=8)
    assert [r.name for r in report.rows] == ["dense", "expert@0.35"]
    assert all(0.0 <= r.metric <= 1.0 and r.latency_ms > 0 for r in report.rows)
    assert "| expert@0.35 | 2 | 0.35 |" in report.to_markdown()
    assert not doe.is_unplugged(model)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PromptTuningConfig(epochs=0), "epochs: expected a positive int"),
        (lambda: PromptTuningConfig(lr=-1.0), "lr: expected a positive learning rate"),
        (lambda: AttributionConfig(method="saliency"), "method: expected one of"),
        (lambda: AttributionConfig(target="prob"), "target: expected one of"),
        (lambda: ExpertSearchConfig(retune_epochs=-1), "retune_epochs"),
    ],
)
def test_configs_validate(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_task_model_rejects_bad_prompt_and_collapsing_verbalizer(sentiment, tokenizer):
    with pytest.raises(ValueError, match=r"prompt: expected shape \(n_tokens, 32\)"):
        TaskModel(make_tiny("bert"), tokenizer, sentiment.spec, prompt=torch.zeros(4, 31))
    unk_only = tiny_tokenizer([])  # every label word is [UNK]
    with pytest.raises(ValueError, match="maps two labels to one token"):
        TaskModel(make_tiny("gpt2"), unk_only, sentiment.spec, readout="verbalizer")
