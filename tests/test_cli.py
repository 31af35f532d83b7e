"""The `doe` command on a tiny BERT saved to a folder: localize -> eval -> run, help and errors."""

import json
import subprocess
import sys

import pytest

import doe
from doe.cli import main
from doe.tasks import load_task
from tiny_models import make_tiny, tiny_tokenizer

TASK = "offline_question"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    data = load_task(TASK)
    folder = tmp_path_factory.mktemp("tiny-bert")
    make_tiny("bert", head=False).save_pretrained(folder)
    tiny_tokenizer([e.text for e in data.train], data.spec.label_words).save_pretrained(folder)
    return folder


def _wider_bert(folder):
    model = make_tiny("bert", head=False)
    config = model.config
    config.intermediate_size = 40
    type(model)(config).save_pretrained(folder)


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "doe.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "localize", "eval", "run", "router", "bench", "tasks"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "doe.cli", "localize", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--keep" in out.stdout and "--method" in out.stdout


def test_localize_eval_run_round_trip(model_dir, tmp_path, capsys):
    experts = tmp_path / "experts"
    args = ["--model", str(model_dir), "--device", "cpu", "--task", TASK, "--max-train", "32"]
    assert main(["localize", *args, "--out", str(experts), "--keep", "0.35", "--keep", "0.2",
                 "--epochs", "1", "--retune-epochs", "1", "--prompt-tokens", "2"]) == 0
    assert "kept" in capsys.readouterr().out
    e35 = doe.TaskExpert.from_pretrained(experts / "keep0.35")
    e20 = doe.TaskExpert.from_pretrained(experts / "keep0.2")
    assert e35.task == TASK and e35.keep_ratio > e20.keep_ratio
    assert e35.metadata["method"] == "attribution" and e35.prompt.shape[0] == 2

    assert main(["eval", "--model", str(model_dir), "--device", "cpu", "--max-eval", "16", "--experts",
                 str(experts / "keep0.35"), str(experts / "keep0.2")]) == 0
    table = capsys.readouterr().out
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert f"| dense | {layers} | 1.00 |" in table
    assert (f"| keep0.35 (attribution) | {layers} | 0.35 |" in table
            and f"| keep0.2 (attribution) | {layers} | 0.20 |" in table)
    # without --model: the model the experts record (the folder they were made on)
    assert e35.metadata["model_name"] == str(model_dir.resolve())
    assert main(["eval", "--device", "cpu", "--max-eval", "16", "--experts", str(experts / "keep0.35")]) == 0
    assert f"| keep0.35 (attribution) | {layers} | 0.35 |" in capsys.readouterr().out
    other = tmp_path / "other-model"  # same family, another FFN size: another fingerprint
    _wider_bert(other)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (model_dir / f).is_file():
            (other / f).write_bytes((model_dir / f).read_bytes())
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(other), "--device", "cpu", "--max-eval", "16", "--experts",
              str(experts / "keep0.35")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert e35.fingerprint in err and str(model_dir.resolve()) in err and "Traceback" not in err

    requests = tmp_path / "in.jsonl"
    texts = [e.text for e in load_task(TASK, max_eval=5).eval]
    requests.write_text("".join(json.dumps({"text": t, "task": TASK, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.jsonl"
    assert main(["run", "--model", str(model_dir), "--device", "cpu", "--experts", str(experts / "keep0.35"),
                 "--requests", str(requests), "--out", str(out)]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == list(range(len(texts)))
    assert all(r["expert"] == TASK and r["label"] in ("statement", "question") for r in results)
    mixed = tmp_path / "mixed.jsonl"  # --mixed: the same answers
    assert main(["run", "--model", str(model_dir), "--device", "cpu", "--experts", str(experts / "keep0.35"),
                 "--requests", str(requests), "--out", str(mixed), "--mixed"]) == 0
    assert [(r["id"], r["label"]) for r in map(json.loads, mixed.read_text().splitlines())] == [
        (r["id"], r["label"]) for r in results]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["localize", "--model", "/no/such/model", "--task", TASK, "--out", "x"], "a local model folder"),
        (["localize", "--task", "no_such_task", "--out", "x"], "no_such_task"),
        (["eval", "--experts", "/no/such/expert"], "not an expert folder"),
        (["eval"], "--experts: give at least one expert folder"),
        (["localize", "--train", "data.csv", "--out", "x"], "--train needs --labels"),
    ],
    ids=["bad-model", "bad-task", "bad-expert", "no-expert", "train-without-labels"],
)
def test_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_run_reports_bad_jsonl(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", str(model_dir), "--device", "cpu", "--requests", str(bad), "--out",
              str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2 and "bad.jsonl:2: not a JSON line" in capsys.readouterr().err


def test_bench_names_the_extra_it_needs(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "needs matplotlib" in err and '.[bench]' in err
    assert not (tmp_path / "b").exists()


def test_tasks_lists_offline_and_hub_tasks(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "offline_sentiment" in out and "hub: glue/sst2" in out
