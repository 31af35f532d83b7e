"""The `doe` command on a user's own data: self-describing expert folders, arguments checked
before any work, `doe router fit`, eval row names and JSON, empty request files."""

import csv
import json

import pytest
import torch

import doe
from doe.cli import _default_task_name, main
from doe.tasks import TASKS, load_task
from tiny_models import make_tiny, tiny_tokenizer

TASKS_USED = ("offline_question", "offline_sentiment")
FAST = ["--epochs", "1", "--retune-epochs", "0", "--prompt-tokens", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    data = {t: load_task(t) for t in TASKS_USED}
    texts = [e.text for d in data.values() for e in d.train]
    words = [w for d in data.values() for w in d.spec.label_words]
    folder = tmp_path_factory.mktemp("tiny-bert")
    make_tiny("bert", head=False).save_pretrained(folder)
    tiny_tokenizer(texts, words).save_pretrained(folder)
    return folder


def _write_csv(path, examples, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for e in examples:
            w.writerow([e.text, labels[e.label]])
    return path


@pytest.fixture(scope="module")
def local_expert(model_dir, tmp_path_factory):
    """An expert localized from CSV files in data/questions/ (so its task is named 'questions')."""
    root = tmp_path_factory.mktemp("user")
    data = load_task("offline_question", max_train=32, max_eval=12)
    labels = data.spec.labels
    train = _write_csv(root / "data" / "questions" / "train.csv", data.train, labels)
    test = _write_csv(root / "data" / "questions" / "test.csv", data.eval, labels)
    out = root / "experts" / "mine"
    assert main(["localize", "--model", str(model_dir), "--device", "cpu", "--train", str(train),
                 "--eval-file", str(test), "--labels", ",".join(labels), "--out", str(out), "--keep", "0.35",
                 *FAST]) == 0
    TASKS.pop("questions", None)  # what a new process knows: only the built-in tasks
    return {"root": root, "out": out, "train": train, "test": test, "labels": labels, "texts": data.eval}


def test_default_task_name_is_the_data_folder_or_custom(tmp_path):
    assert _default_task_name(str(tmp_path / "reviews" / "train.csv")) == "reviews"
    assert _default_task_name(str(tmp_path / "data" / "train.csv")) == "custom"


def test_task_name_names_a_local_task(local_expert, model_dir, tmp_path, monkeypatch):
    monkeypatch.delitem(TASKS, "my_questions", raising=False)
    out = tmp_path / "named"
    assert main(["localize", "--model", str(model_dir), "--device", "cpu", "--train", str(local_expert["train"]),
                 "--eval-file", str(local_expert["test"]), "--labels", ",".join(local_expert["labels"]),
                 "--task-name", "my_questions", "--out", str(out), *FAST]) == 0
    assert doe.TaskExpert.from_pretrained(out).task == "my_questions"


def test_expert_folder_carries_its_task(local_expert, monkeypatch):
    monkeypatch.delitem(TASKS, "questions", raising=False)
    config = json.loads((local_expert["out"] / "expert_config.json").read_text())
    spec = config["metadata"]["task_spec"]
    assert config["task"] == "questions" and spec["name"] == "questions"
    assert spec["labels"] == list(local_expert["labels"]) and spec["text_fields"] == ["text"]
    assert spec["metric"] == "accuracy"
    expert = doe.TaskExpert.from_pretrained(local_expert["out"])
    assert expert.task == "questions" and expert.spec().labels == tuple(local_expert["labels"])
    assert "questions" not in TASKS  # loading registers nothing globally


def test_run_serves_a_local_expert_from_its_folder_alone(local_expert, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(TASKS, "questions", raising=False)
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps({"text": e.text, "task": "questions"}) + "\n"
                                for e in local_expert["texts"][:4]))
    out = tmp_path / "out.jsonl"
    assert main(["run", "--model", str(model_dir), "--device", "cpu", "--experts", str(local_expert["out"]),
                 "--requests", str(requests), "--out", str(out)]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 4
    assert all(r["expert"] == "questions" and r["label"] in local_expert["labels"] for r in results)


def test_eval_needs_only_the_folder_and_an_eval_file(local_expert, model_dir, monkeypatch, capsys):
    monkeypatch.delitem(TASKS, "questions", raising=False)
    assert main(["eval", "--model", str(model_dir), "--device", "cpu", "--experts", str(local_expert["out"]),
                 "--eval-file", str(local_expert["test"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "questions" and report["metric"] == "accuracy"
    assert [r["name"] for r in report["rows"]] == ["dense", "mine (attribution)"]
    assert all(0.0 <= r["metric"] <= 1.0 for r in report["rows"])


def test_eval_rows_are_named_by_folder_and_method(local_expert, model_dir, tmp_path, capsys):
    twin = tmp_path / "other" / "mine"
    doe.TaskExpert.from_pretrained(local_expert["out"]).save_pretrained(twin)
    assert main(["eval", "--model", str(model_dir), "--device", "cpu", "--experts", str(local_expert["out"]),
                 str(twin), "--eval-file", str(local_expert["test"])]) == 0
    table = capsys.readouterr().out
    assert "| mine/mine (attribution) |" not in table
    assert "| experts/mine (attribution) |" in table and "| other/mine (attribution) |" in table


def test_run_with_no_requests_says_so(local_expert, model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", "--model", str(model_dir), "--device", "cpu", "--experts", str(local_expert["out"]),
                 "--requests", str(empty), "--out", str(out)]) == 0
    assert "holds no requests" in capsys.readouterr().err
    assert out.read_text() == ""


def test_router_fit_then_run_routes_mixed_requests(model_dir, tmp_path, capsys):
    folders = []
    for task in TASKS_USED:
        folder = tmp_path / "experts" / task
        assert main(["localize", "--model", str(model_dir), "--device", "cpu", "--task", task,
                     "--max-train", "24", "--out", str(folder), *FAST]) == 0
        folders.append(str(folder))
    router = tmp_path / "router"
    assert main(["router", "fit", "--model", str(model_dir), "--device", "cpu", "--experts", *folders,
                 "--out", str(router), "--max-per-task", "40"]) == 0
    assert "router over 2 tasks" in capsys.readouterr().out
    assert doe.TaskRouter.from_pretrained(router).tasks == list(TASKS_USED)

    mixed = [(e.text, t) for t in TASKS_USED for e in load_task(t, max_train=40).train[:6]]
    requests = tmp_path / "mixed.jsonl"
    requests.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, (text, _) in enumerate(mixed)))
    out = tmp_path / "out.jsonl"
    assert main(["run", "--model", str(model_dir), "--device", "cpu", "--experts", *folders, "--router",
                 str(router), "--threshold", "0", "--requests", str(requests), "--out", str(out)]) == 0
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(r["routed"] for r in results.values())
    right = sum(results[i]["task"] == t for i, (_, t) in enumerate(mixed))
    assert right >= 0.8 * len(mixed), f"routed {right}/{len(mixed)} requests to their task"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["localize", "--task", "offline_question", "--keep", "0.35", "--keep", "1.5"], "expected a fraction in (0, 1]"),
        (["localize", "--task", "offline_question", "--keep", "0.35", "--keep", "0.35"], "distinct keep ratios"),
        (["localize", "--task", "offline_question", "--device", "tpu"], "expected cpu, cuda or cuda:N"),
        (["localize", "--task", "offline_question", "--out", "{file}/x"], "is a file"),
        (["demo", "--requests", "0"], "--requests: expected >= 1, got 0"),
        (["demo", "--cache", "{file}/cache"], "--cache"),
        (["router", "fit", "--experts", "/no/such/expert", "--out", "{tmp}/r"], "not an expert folder"),
        (["router", "fit", "--out", "{tmp}/r", "--train", "nofile"], "expected TASK=FILE"),
        (["eval", "--experts", "x", "--eval-file", "/no/such.csv"], "--eval-file: expected a data file"),
        (["run", "--requests", "{file}", "--out", "{tmp}"], "expected a file path, got the folder"),
        (["run", "--requests", "{file}", "--out", "{tmp}/o", "--mixed", "--compact-weights"], "give one of them"),
        (["serve", "--experts", "x", "--mixed", "--compact-weights"], "give one of them"),
        (["localize", "--task", "offline_question", "--dense-blocks", "first"], "--dense-blocks: expected auto, none"),
        (["localize", "--task", "offline_question", "--dense-blocks", "0,0"], "distinct block numbers"),
    ],
    ids=["keep-out-of-range", "keep-twice", "bad-device", "out-under-file", "demo-no-requests", "cache-under-file",
         "router-bad-expert", "router-bad-train", "eval-missing-file", "run-out-is-folder", "run-compact-mixed",
         "serve-compact-mixed", "dense-blocks-word", "dense-blocks-twice"],
)
def test_arguments_are_checked_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    import doe.cli

    def no_work(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(doe.cli, "_load_model", no_work)
    monkeypatch.setattr(doe.cli, "_load_data", no_work)
    file = tmp_path / "file.jsonl"
    file.write_text('{"text": "hi"}\n')
    argv = [a.format(file=file, tmp=tmp_path) for a in argv]
    if argv[0] == "localize" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
def test_cuda_on_a_cpu_build_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cuda", "--cache", str(tmp_path)])
    assert exc.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err


def test_help_and_parsing_load_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, doe, doe.cli; doe.cli.build_parser().parse_args(['run', '--requests', 'r', '--out', 'o']); "
            "print([m for m in ('torch', 'transformers', 'datasets', 'triton', 'fastapi') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert doe.TaskExpert is doe.expert.TaskExpert and "unplug_" in dir(doe)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        doe.no_such_name


def test_localize_on_a_training_file_alone_holds_out_part_of_it(local_expert, model_dir, tmp_path, capsys):
    """No --eval-file: 20% of --train is held out (stratified, the same rows on every load), the
    bars are numbered phases, and no library prints its own bars or split messages."""
    out = tmp_path / "alone"
    assert main(["localize", "--model", str(model_dir), "--device", "cpu", "--train", str(local_expert["train"]),
                 "--labels", ",".join(local_expert["labels"]), "--task-name", "alone", "--out", str(out),
                 "--epochs", "1", "--retune-epochs", "1", "--prompt-tokens", "2"]) == 0
    err = capsys.readouterr().err
    for label in ("[1/3] prompt tuning alone", "[2/3] scoring neurons of alone", "[3/3] re-tuning alone"):
        assert label in err
    assert "Generating" not in err and "Loading weights" not in err
    spec = doe.TaskExpert.from_pretrained(out).metadata["task_spec"]
    assert spec["holdout"] == 0.2

    TASKS.pop("alone", None)
    assert main(["eval", "--model", str(model_dir), "--device", "cpu", "--experts", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == round(0.2 * 32)  # the held-out rows of the 32-row training file


def test_quiet_shows_no_bars(local_expert, model_dir, tmp_path, capsys):
    assert main(["localize", "--model", str(model_dir), "--device", "cpu", "--train", str(local_expert["train"]),
                 "--eval-file", str(local_expert["test"]), "--labels", ",".join(local_expert["labels"]),
                 "--task-name", "hush", "--out", str(tmp_path / "q"), "--quiet", *FAST]) == 0
    assert capsys.readouterr().err == ""
    TASKS.pop("hush", None)
