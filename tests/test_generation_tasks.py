"""Generation tasks end to end on a tiny decoder: (prompt, completion) files, the teacher-forced
log-likelihood, tuning, localization, evaluation and ``doe run``. The data is a synthetic task
written here (copy two words); references are plain-PyTorch loops on the model's own forward
or on a hand-sliced copy."""

import json
import random

import pytest
import torch

import doe
from doe.cli import main
from doe.evaluate import evaluate
from doe.generative import GenerativeTaskModel
from doe.attribution import mean_down_inputs
from doe.localize import ExpertSearchConfig, LocalizationConfig, compensation_offsets, find_expert
from doe.metrics import exact_match, rouge_l
from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
from doe.runtime import UnplugAndPlay
from doe.tasks import Example, TaskSpec, generation_task, load_task
from doe.testing import assert_same_as, sliced_copy, snapshot, with_down_bias
from tiny_models import make_tiny, tiny_tokenizer

WORDS = "red green blue cat dog sun moon tree rock fish".split()
QUIET = dict(show_progress=False)


def write_copy_task(folder, n=40, seed=0):
    """A synthetic generation task: the completion repeats the prompt's two words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append({"question": f"copy {a} {b}", "answer": f"{a} {b}"})
    path = folder / "copy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def task(tmp_path):
    spec = generation_task("copy", write_copy_task(tmp_path), prompt_field="question", completion_field="answer",
                           holdout=0.25)
    return load_task(spec)


@pytest.fixture()
def tok():
    return tiny_tokenizer(["copy " + " ".join(WORDS)])


def by_hand_log_likelihood(model, prompt, ids, completion):
    """Sum of log p(completion token | soft prompt, prompt tokens, earlier completion tokens)."""
    tokens = model.get_input_embeddings()(torch.tensor([ids + completion]))
    embeds = torch.cat([prompt[None], tokens], 1)
    logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0].float(), -1)
    start = prompt.shape[0] + len(ids)
    return sum(float(logp[start - 1 + j, t]) for j, t in enumerate(completion))


def greedy_by_hand(model, prompt, ids, n, eos):
    out = []
    with torch.no_grad():
        for _ in range(n):
            tokens = model.get_input_embeddings()(torch.tensor([ids + out]))
            nxt = int(model(inputs_embeds=torch.cat([prompt[None], tokens], 1)).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out


def test_a_generation_spec_reads_prompts_and_completions(task):
    spec = task.spec
    assert spec.is_generation and spec.metric == "nll" and spec.labels == ()
    assert (spec.prompt_field, spec.completion_field) == ("question", "answer")
    assert len(task.train) == 30 and len(task.eval) == 10
    e = task.train[0]
    assert e.text.startswith("copy ") and e.completion == e.text[len("copy "):]
    for bad, match in [(dict(labels=("a", "b")), "has no labels"), (dict(metric="accuracy2"), "unknown metric"),
                       (dict(text_fields=("q", "r")), "one prompt field")]:
        with pytest.raises(ValueError, match=match):
            TaskSpec("g", **{"labels": (), "task_type": "generation", **bad})
    with pytest.raises(ValueError, match="task_type: expected one of"):
        TaskSpec("g", ("a", "b"), task_type="summary")
    assert isinstance(TaskModel(make_tiny("llama"), tiny_tokenizer(), spec), GenerativeTaskModel)
    with pytest.raises(ValueError, match="needs a decoder LM"):
        TaskModel(make_tiny("bert"), tiny_tokenizer(), spec)


def test_an_empty_completion_is_refused_with_its_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": " "}\n')
    with pytest.raises(ValueError, match=r"row 1: completion field 'completion': expected a non-empty text"):
        load_task(generation_task("bad", {"train": str(path), "validation": str(path)}))


@torch.no_grad()
def test_the_log_likelihood_is_the_completion_tokens_under_teacher_forcing(task, tok):
    model = make_tiny("llama")
    tm = TaskModel(model, tok, task.spec, num_tokens=3)
    batch = task.train[:4] + [Example("copy red", 0, completion="red green blue cat")]  # rows of other lengths
    enc = tm.encode(batch)
    got = tm(**enc)
    for r, e in enumerate(batch):
        ids, completion = tm.prompt_ids(e.text), tm.completion_ids(e.completion)
        assert completion[-1] == model.generation_config.eos_token_id
        want = by_hand_log_likelihood(model, tm.prompt.detach(), ids, completion)
        assert got[r].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert tm.loss(batch).item() == pytest.approx(-got.sum().item() / (enc["labels"] >= 0).sum().item(), rel=1e-6)


def test_tuning_lowers_the_nll_and_leaves_the_backbone_as_it_was(task, tok):
    model = make_tiny("llama")
    snap = snapshot(model)
    tm = TaskModel(model, tok, task.spec, num_tokens=3)
    before = tm.loss(task.train).item()
    prompt_tune(tm, task, PromptTuningConfig(epochs=3, lr=0.1, batch_size=8, **QUIET))
    assert tm.loss(task.train).item() < before
    assert_same_as(model, snap)


def test_an_expert_of_a_generation_task_scores_as_a_hand_sliced_model(task, tok):
    model = make_tiny("llama")
    config = ExpertSearchConfig(prompt=PromptTuningConfig(epochs=1, num_tokens=2, **QUIET),
                                localization=LocalizationConfig(keep_ratio=0.5), retune_epochs=1)
    config.attribution.show_progress = False
    result = find_expert(model, tok, task, config)
    expert = result.expert
    assert expert.task == "copy" and expert.head is None and expert.prompt is not None
    assert expert.metadata["task_spec"]["task_type"] == "generation"
    report = evaluate(model, tok, task, result.task_model, [expert], batch_size=4, zero_shot=True)
    assert [r.name for r in report.rows] == ["dense", "zero-shot", "expert@0.50"]
    # re-tuning trained each block's offset from its compensation: the reference carries them as biases
    means = mean_down_inputs(result.task_model, list(task.train))
    compensation = compensation_offsets(model, expert, means)
    assert all(not torch.allclose(o, c) for o, c in zip(expert.offsets, compensation))
    sliced = with_down_bias(sliced_copy(model, expert.indices), expert.offsets)
    tm = TaskModel(model, tok, task.spec)  # the layout (prompt ids, completion ids) only
    eos = model.generation_config.eos_token_id
    nll = count = em = rl = 0.0
    longest = max(len(tm.completion_ids(e.completion)) for e in task.eval)
    with torch.no_grad():
        for e in task.eval:
            ids, completion = tm.prompt_ids(e.text), tm.completion_ids(e.completion)
            nll -= by_hand_log_likelihood(sliced, expert.prompt, ids, completion)
            count += len(completion)
            out = greedy_by_hand(sliced, expert.prompt, ids, longest, eos)
            text = tok.decode(out, skip_special_tokens=True)
            em, rl = em + exact_match(text, e.completion), rl + rouge_l(text, e.completion)
    row = report.row("expert@0.50")
    assert row.metric == pytest.approx(nll / count, rel=1e-4)
    assert row.extra["exact_match"] == pytest.approx(em / len(task.eval))
    assert row.extra["rouge_l"] == pytest.approx(rl / len(task.eval))
    assert "| NLL/token | perplexity | exact match | ROUGE-L |" in report.to_markdown()


def test_the_runtime_generates_for_a_generation_task_as_the_hand_sliced_model(task, tok):
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(0)
    indices = [torch.randperm(b.num_neurons, generator=g)[: b.num_neurons // 2].sort().values.int()
               for b in doe.find_ffn_blocks(model)]
    prompt = torch.randn(2, model.config.hidden_size, generator=g) * 0.1
    expert = doe.TaskExpert.from_indices(model, indices, task="copy",
                                         metadata={"task_spec": doe.tasks.spec_to_dict(task.spec)})
    expert.prompt = prompt
    tm = TaskModel(model, tok, task.spec)
    sliced = sliced_copy(model, indices)
    eos = model.generation_config.eos_token_id
    for mixed in (False, True):
        snap = snapshot(model)
        rt = UnplugAndPlay(model, tok, mixed=mixed)
        rt.add_expert(expert)
        requests = [{"text": e.text, "task": "copy", "max_new_tokens": 3} for e in task.eval[:3]]
        results = rt.process(requests)
        for req, res in zip(requests, results):
            want = greedy_by_hand(sliced, prompt, tm.prompt_ids(req["text"]), 3, eos)
            assert res.error is None and res.text == tok.decode(want, skip_special_tokens=True), (mixed, res)
            assert res.finish_reason in ("stop", "length") and res.label is None
        assert_same_as(model, snap)
        with pytest.raises(ValueError, match="request 0: 'max_new_tokens' must be a positive integer, got 0"):
            rt.process([{"text": "copy sun", "task": "copy", "max_new_tokens": 0}])


def test_localize_eval_and_run_commands_on_a_generation_task(tmp_path, tok, capsys):
    folder = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    data = write_copy_task(tmp_path)
    out = tmp_path / "expert"
    assert main(["localize", "--model", str(folder), "--train", str(data), "--task-type", "generation",
                 "--prompt-field", "question", "--completion-field", "answer", "--task-name", "copy", "--out", str(out),
                 "--keep", "0.5",
                 "--epochs", "1", "--retune-epochs", "0", "--prompt-tokens", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--experts", str(out), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "nll" and [r["name"] for r in report["rows"]][:2] == ["dense", "zero-shot"]
    assert all(r["metric"] > 0 and 0 <= r["extra"]["rouge_l"] <= 1 for r in report["rows"])
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"text": "copy red dog", "task": "copy", "max_new_tokens": 2}) + "\n")
    assert main(["run", "--experts", str(out), "--requests", str(requests), "--out", str(tmp_path / "o.jsonl")]) == 0
    (line,) = (tmp_path / "o.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert result["error"] is None and isinstance(result["text"], str) and result["finish_reason"] in ("stop", "length")
    with pytest.raises(SystemExit) as exit_:
        main(["localize", "--model", str(folder), "--train", str(data), "--task-type", "generation", "--labels", "a,b",
              "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "--labels: a generation task has none" in capsys.readouterr().err


def test_exact_match_and_rouge_l():
    assert exact_match("Paris.", "paris") == 1.0 and exact_match("Paris France", "Paris") == 0.0
    assert rouge_l("the cat sat", "the cat") == pytest.approx(0.8)  # LCS 2: P 2/3, R 1
    assert rouge_l("a b c d", "a c e d") == pytest.approx(0.75)  # LCS a c d
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("x y", "z") == 0.0
