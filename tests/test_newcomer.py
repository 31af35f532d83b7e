"""A newcomer's session through the real ``doe`` entry point, from a fresh cache: localize on
local CSV files -> evaluate from the expert folder alone -> fit a router -> serve mixed
requests (gathered and compact). Each step is a new process, as on a user's shell; no step may
print a traceback. The model is a tiny BERT saved as a local folder."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from doe.tasks import load_task
from tiny_models import make_tiny, tiny_tokenizer

TASKS = {"offline_sentiment": "reviews", "offline_question": "questions"}  # offline task -> user's folder


def _doe(*argv, cwd, env):
    script = Path(sys.executable).with_name("doe")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from doe.cli import main; "
                                                   "sys.exit(main())"]
    proc = subprocess.run(cmd + [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, f"doe {' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_newcomer_session(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    data = {t: load_task(t, max_train=40, max_eval=16) for t in TASKS}
    model_dir = tmp_path / "model"
    make_tiny("bert", head=False).save_pretrained(model_dir)
    tiny_tokenizer([e.text for d in data.values() for e in d.train + d.eval],
                   [w for d in data.values() for w in d.spec.label_words]).save_pretrained(model_dir)
    for task, folder in TASKS.items():
        for split, rows in (("train", data[task].train), ("test", data[task].eval)):
            path = tmp_path / "data" / folder / f"{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows([e.text, data[task].spec.labels[e.label]] for e in rows)
    common = ["--model", model_dir, "--device", "cpu"]
    fast = ["--epochs", "2", "--retune-epochs", "1", "--prompt-tokens", "2"]

    for task, folder in TASKS.items():  # one with a held-out file, one holding out part of train.csv
        held_out = ["--eval-file", f"data/{folder}/test.csv"] if folder == "questions" else []
        _doe("localize", *common, "--train", f"data/{folder}/train.csv", *held_out, "--labels",
             ",".join(data[task].spec.labels), "--out", f"experts/{folder}", *fast, "--quiet", cwd=tmp_path, env=env)

    report = json.loads(_doe("eval", *common, "--experts", "experts/reviews", "--json", cwd=tmp_path, env=env).stdout)
    assert report["task"] == "reviews" and report["examples"] == 8  # 20% of the 40 training rows
    report = json.loads(_doe("eval", *common, "--experts", "experts/questions", "--eval-file",
                             "data/questions/test.csv", "--json", cwd=tmp_path, env=env).stdout)
    assert report["task"] == "questions" and report["examples"] == 16
    assert [r["name"].split(" ")[0] for r in report["rows"]][1:] == ["questions"]

    _doe("router", "fit", *common, "--experts", "experts/reviews", "experts/questions", "--out", "router",
         "--quiet", cwd=tmp_path, env=env)

    texts = [(e.text, TASKS[t]) for t in TASKS for e in data[t].eval[:6]]
    lines = [{"text": text, **({"task": task} if i % 2 else {})} for i, (text, task) in enumerate(texts)]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    results = {}
    for flag in ([], ["--compact-weights"]):
        out = f"out{len(flag)}.jsonl"
        _doe("run", *common, "--experts", "experts/reviews", "experts/questions", "--router", "router",
             "--requests", "requests.jsonl", "--out", out, *flag, cwd=tmp_path, env=env)
        results[bool(flag)] = [json.loads(x) for x in (tmp_path / out).read_text().splitlines()]
    for gathered, compact in zip(results[False], results[True]):
        assert gathered["error"] is None and gathered["label"] is not None
        assert (compact["label"], compact["expert"]) == (gathered["label"], gathered["expert"])
    named = [r for r, req in zip(results[False], lines) if "task" in req]
    assert all(r["task"] == req["task"] and not r["routed"] for r, req in zip(named, lines[1::2]))
    assert not any((tmp_path / "home").rglob("*.safetensors"))  # nothing written outside the project
