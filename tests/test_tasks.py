"""The task layer: registry, offline suite, local files, hub entries (load_dataset mocked), metrics."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import re

import datasets
import pytest

import doe.tasks as T
from doe.task_loading import subsample
from doe.tasks import Example, TaskSpec, compute_metric, get_task, load_task, local_task, register_task

EXPECTED_OFFLINE = {
    "offline_sentiment": (("negative", "positive"), 400, 160),
    "offline_topic": (("sports", "technology", "business", "science"), 480, 160),
    "offline_question": (("statement", "question"), 400, 160),
    "offline_spam": (("ham", "spam"), 400, 160),
}


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def offline_data():
    return {name: load_task(name) for name in T.OFFLINE_TASKS}


# ---------------------------------------------------------------------------------------------
# the offline suite
# ---------------------------------------------------------------------------------------------


def test_offline_suite_is_registered():
    assert set(T.OFFLINE_TASKS) == set(EXPECTED_OFFLINE)
    for name in T.OFFLINE_TASKS:
        spec = get_task(name)
        assert spec.dataset == "json" and spec.text_fields == ("text",)
        assert set(spec.data_files) == {"train", "validation"}


@pytest.mark.parametrize("name", sorted(EXPECTED_OFFLINE))
def test_offline_task_loads(offline_data, name):
    labels, n_train, n_eval = EXPECTED_OFFLINE[name]
    data = offline_data[name]
    assert data.spec.labels == labels
    assert (len(data.train), len(data.eval)) == (n_train, n_eval)
    for split, n in ((data.train, n_train), (data.eval, n_eval)):
        assert all(isinstance(e, Example) and isinstance(e.text, str) and e.text and e.text_pair is None
                   for e in split)
        counts = collections.Counter(e.label for e in split)
        assert counts == {i: n // len(labels) for i in range(len(labels))}   # exactly balanced
    train_keys = {_norm(e.text) for e in data.train}
    assert len(train_keys) == n_train                                    # no duplicates within train
    assert not train_keys & {_norm(e.text) for e in data.eval}           # none shared with validation
    assert len({_norm(e.text) for e in data.eval}) == n_eval


def test_offline_tasks_differ(offline_data):
    label_sets = {name: d.spec.labels for name, d in offline_data.items()}
    assert len(set(label_sets.values())) == len(label_sets)
    vocab = {name: collections.Counter(w for e in d.train for w in _norm(e.text).split())
             for name, d in offline_data.items()}
    names = sorted(vocab)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            top_a = {w for w, _ in vocab[a].most_common(40)}
            top_b = {w for w, _ in vocab[b].most_common(40)}
            assert len(top_a & top_b) / 40 < 0.6, (a, b)


def test_question_task_needs_more_than_the_question_mark(offline_data):
    data = offline_data["offline_question"]
    q = data.spec.labels.index("question")
    ends = [(e.text.rstrip().endswith("?"), e.label == q) for e in data.train]
    rule_acc = sum(a == b for a, b in ends) / len(ends)
    assert rule_acc < 0.9
    statements = [e.text.lower() for e in data.train if e.label != q]
    assert any(w in s.split() for s in statements for w in ("where", "why", "when", "how"))


def test_sentiment_task_uses_negation(offline_data):
    data = offline_data["offline_sentiment"]
    pos = [e.text for e in data.train if e.label == 1]
    neg = [e.text for e in data.train if e.label == 0]
    assert any("not bad" in t or "hardly" in t for t in pos)
    assert any(" not " in t for t in neg)


def test_offline_files_match_the_generator(tmp_path):
    path = T.OFFLINE_DIR.parent / "make_offline.py"
    spec = importlib.util.spec_from_file_location("_doe_make_offline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.write_suite(T.OFFLINE_DIR, check=True) == []
    mod.write_suite(tmp_path)                                            # deterministic: same bytes twice
    for name in T.OFFLINE_TASKS:
        for split in ("train", "validation"):
            assert (tmp_path / name / f"{split}.jsonl").read_bytes() == \
                (T.OFFLINE_DIR / name / f"{split}.jsonl").read_bytes()


def test_subsampling_is_seeded_and_stratified():
    a = load_task("offline_topic", max_train=40, max_eval=10, seed=3)
    b = load_task("offline_topic", max_train=40, max_eval=10, seed=3)
    c = load_task("offline_topic", max_train=40, max_eval=10, seed=4)
    assert (len(a.train), len(a.eval)) == (40, 10)
    assert [e.text for e in a.train] == [e.text for e in b.train]
    assert [e.text for e in a.eval] == [e.text for e in b.eval]
    assert [e.text for e in a.train] != [e.text for e in c.train]
    assert collections.Counter(e.label for e in a.train) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert set(collections.Counter(e.label for e in a.eval).values()) <= {2, 3}
    assert len({e.label for e in load_task("offline_topic", max_train=4).train}) == 4


def test_subsample_helper_edge_cases():
    labels = [0] * 97 + [1] * 3
    idx = subsample(labels, 10, seed=0)
    assert len(idx) == 10 and idx == sorted(idx)
    assert collections.Counter(labels[i] for i in idx) == {0: 9, 1: 1}   # the rare class is kept
    assert subsample(labels, None, 0) == list(range(100))
    assert subsample(labels, 1000, 0) == list(range(100))
    assert subsample(labels, 0, 0) == []


# ---------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------


def _write_csv(path, rows, header=("review", "stars")):
    lines = [",".join(header)] + [f'"{t}",{y}' for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_local_csv_with_string_labels(tmp_path):
    train = [(f"great thing number {i}", "good") if i % 2 else (f"bad thing number {i}", "bad") for i in range(20)]
    dev = [("fine indeed", "good"), ("awful, really", "bad"), ("Good enough", "GOOD")]
    _write_csv(tmp_path / "train.csv", train)
    _write_csv(tmp_path / "dev.csv", dev)
    spec = local_task("reviews", {"train": tmp_path / "train.csv", "validation": tmp_path / "dev.csv"},
                      labels=("bad", "good"), text_fields="review", label_field="stars", metric="f1")
    assert spec.dataset == "csv" and spec.text_fields == ("review",)
    data = load_task(spec)
    assert len(data.train) == 20 and len(data.eval) == 3
    assert data.train[0] == Example("bad thing number 0", 0)
    assert [e.label for e in data.eval] == [1, 0, 1]                    # "GOOD" matches case-insensitively
    assert data.eval[1].text == "awful, really"


def test_local_jsonl_pairs_int_labels_and_slices(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "y": i % 3} for i in range(30)]
    f = tmp_path / "all.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = local_task("nli", str(f), labels=("entailment", "neutral", "contradiction"),
                      text_fields=("premise", "hypothesis"), label_field="y",
                      train_split="train[:80%]", eval_split="train[80%:]", metric="macro_f1")
    assert spec.dataset == "json" and spec.is_pair and spec.num_labels == 3
    data = load_task(spec)
    assert [e.text for e in data.train] == [f"p{i}" for i in range(24)]
    assert [(e.text, e.text_pair, e.label) for e in data.eval] == [(f"p{i}", f"h{i}", i % 3) for i in range(24, 30)]


def test_local_jsonl_string_labels_and_registration(tmp_path):
    for split, n in (("train", 12), ("validation", 4)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} {i}", "label": ["cat", "dog"][i % 2]}) + "\n" for i in range(n)))
    spec = local_task("pets", {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")},
                      labels=["cat", "dog"])
    assert spec.labels == ("cat", "dog") and spec.label_words == ("cat", "dog")
    register_task(spec)
    try:
        assert get_task("pets") is spec
        with pytest.raises(ValueError, match="already registered"):
            register_task(spec)
        register_task(spec, overwrite=True)
        data = load_task("pets", max_train=6)
        assert collections.Counter(e.label for e in data.train) == {0: 3, 1: 3}
    finally:
        T.TASKS.pop("pets", None)


def test_local_task_format_inference(tmp_path, monkeypatch):
    assert local_task("a", "x.parquet", labels=("n", "y")).dataset == "parquet"
    assert local_task("a", "x.json.gz", labels=("n", "y")).dataset == "json"
    assert local_task("a", "x.txt", labels=("n", "y"), format="csv").dataset == "csv"
    monkeypatch.chdir(tmp_path)
    assert local_task("a", "x.jsonl", labels=("n", "y")).data_files == str(tmp_path / "x.jsonl")   # made absolute
    with pytest.raises(ValueError, match="suffix"):
        local_task("a", "x.txt", labels=("n", "y"))
    with pytest.raises(ValueError, match="mix formats"):
        local_task("a", {"train": "a.csv", "validation": "b.jsonl"}, labels=("n", "y"))
    with pytest.raises(ValueError, match="unknown format"):
        local_task("a", "x.csv", labels=("n", "y"), format="xml")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_unknown_task_lists_known_tasks_and_local_files():
    with pytest.raises(ValueError) as e:
        get_task("no_such_task")
    msg = str(e.value)
    assert "sst2" in msg and "offline_topic" in msg and "local_task" in msg
    assert get_task("SST2") is get_task("sst2")
    with pytest.raises(TypeError):
        get_task(3)


@pytest.mark.parametrize("kw, match", [
    (dict(name="", labels=("a", "b")), "name"),
    (dict(name="t", labels=("a",)), "at least 2 labels"),
    (dict(name="t", labels=("a", "a")), "duplicate"),
    (dict(name="t", labels=("a", "b"), text_fields=()), "one field"),
    (dict(name="t", labels=("a", "b"), text_fields=("x", "y", "z")), "one field"),
    (dict(name="t", labels=("a", "b"), metric="bleu"), "unknown metric"),
    (dict(name="t", labels=("a", "b", "c"), metric="f1"), "macro_f1"),
    (dict(name="t", labels=("a", "b"), verbalizer=("x",)), "one word per label"),
    (dict(name="t", labels=("a", "b"), dataset="json"), "needs data_files"),
    (dict(name="t", labels=("a", "b"), data_files="x.csv"), "without a dataset"),
    (dict(name="t", labels=("a", "b"), label_field="text"), "also a text field"),
    (dict(name="t", labels=("a", "b"), holdout=1.0), "holdout: expected a fraction"),
], ids=["empty-name", "one-label", "dup-labels", "no-fields", "three-fields", "metric", "f1-multiclass",
        "verbalizer", "json-no-files", "files-no-dataset", "label-is-text", "holdout"])
def test_bad_spec(kw, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(**kw)


def test_spec_is_frozen_and_hashable():
    spec = TaskSpec("t", ["a", "b"], "sentence")
    assert spec.labels == ("a", "b") and spec.text_fields == ("sentence",)
    with pytest.raises(Exception):
        spec.name = "u"
    assert hash(spec) == hash(TaskSpec("t", ("a", "b"), ("sentence",)))
    assert hash(get_task("offline_topic"))                              # dict data_files stays out of the hash


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_missing_field_names_present_fields(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"sentence": "hi", "label": 0}, {"sentence": "yo", "label": 1}])
    spec = local_task("t", {"train": f, "validation": f}, labels=("a", "b"))
    with pytest.raises(ValueError, match=r"\['text'\] not in the data.*\['sentence', 'label'\]"):
        load_task(spec)


def test_unknown_label_string(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": "pos"}, {"text": "yo", "label": "meh"}])
    spec = local_task("t", {"train": f, "validation": f}, labels=("neg", "pos"))
    with pytest.raises(ValueError, match=r"unknown label value\(s\) 'meh' \(row 1\).*\('neg', 'pos'\)"):
        load_task(spec)


def test_label_id_out_of_range_and_unlabeled(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": 0}, {"text": "yo", "label": 2}])
    with pytest.raises(ValueError, match="out of range"):
        load_task(local_task("t", {"train": f, "validation": f}, labels=("neg", "pos")))
    g = _jsonl(tmp_path / "g.jsonl", [{"text": "hi", "label": -1}])
    with pytest.raises(ValueError, match="unlabeled"):
        load_task(local_task("t", {"train": g, "validation": g}, labels=("neg", "pos")))


def test_missing_split_and_missing_file(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": 0}, {"text": "yo", "label": 1}])
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['train'\].*train\[80%:\]"):
        load_task(local_task("t", f, labels=("neg", "pos")))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task(local_task("t", {"train": str(tmp_path / "nope.jsonl"), "validation": f}, labels=("a", "b")))


# ---------------------------------------------------------------------------------------------
# hub tasks (datasets.load_dataset mocked: no machine here reaches the Hub)
# ---------------------------------------------------------------------------------------------

HUB_CASES = {
    "sst2": (("glue", "sst2"), {"sentence": ["a", "b", "c"], "label": [0, 1, 1], "idx": [0, 1, 2]}, "validation"),
    "mrpc": (("glue", "mrpc"), {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0], "idx": [0, 1]},
             "validation"),
    "rte": (("glue", "rte"), {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1], "idx": [0, 1]},
            "validation"),
    "qnli": (("glue", "qnli"), {"question": ["q1", "q2"], "sentence": ["s1", "s2"], "label": [0, 1], "idx": [0, 1]},
             "validation"),
    "cola": (("glue", "cola"), {"sentence": ["a", "b"], "label": [0, 1], "idx": [0, 1]}, "validation"),
    "imdb": (("imdb",), {"text": ["good film", "bad film"], "label": [1, 0]}, "test"),
    "ag_news": (("ag_news",), {"text": ["w", "s", "b", "t"], "label": [0, 1, 2, 3]}, "test"),
}


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_hub_task_calls_load_dataset(monkeypatch, name):
    args, cols, eval_split = HUB_CASES[name]
    calls = []

    def fake_load_dataset(*a, **kw):
        calls.append((a, kw))
        ds = datasets.Dataset.from_dict(cols)
        return datasets.DatasetDict({"train": ds, eval_split: ds})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_task(name)
    assert calls == [(args, {})]
    spec = get_task(name)
    assert spec.eval_split == eval_split
    n = len(cols["label"])
    assert len(data.train) == len(data.eval) == n
    first = cols[spec.text_fields[0]]
    assert [e.text for e in data.eval] == first
    assert [e.label for e in data.eval] == cols["label"]
    if spec.is_pair:
        assert [e.text_pair for e in data.eval] == cols[spec.text_fields[1]]
    else:
        assert all(e.text_pair is None for e in data.eval)


def test_hub_specs():
    assert get_task("cola").metric == "matthews_corrcoef"
    assert get_task("mrpc").metric == "f1" and get_task("mrpc").labels[1] == "equivalent"
    assert get_task("ag_news").num_labels == 4 and get_task("ag_news").label_words[3] == "science"
    assert get_task("rte").labels == ("entailment", "not_entailment")
    for name in ("sst2", "rte", "qnli", "imdb"):
        assert get_task(name).metric == "accuracy"


def test_hub_error_from_datasets_is_wrapped(monkeypatch):
    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"(?s)load_dataset\('glue', 'rte'\).*unreachable.*local_task") as e:
        load_task("rte")
    assert isinstance(e.value.__cause__, ConnectionError)

    def other(*a, **kw):
        raise ValueError("BuilderConfig 'foo' not found")

    monkeypatch.setattr(datasets, "load_dataset", other)
    with pytest.raises(RuntimeError, match="BuilderConfig"):
        load_task("rte")


# ---------------------------------------------------------------------------------------------
# metrics, against values computed by hand
# ---------------------------------------------------------------------------------------------


def test_accuracy():
    assert compute_metric("accuracy", [1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert compute_metric("accuracy", [2, 2], [2, 2]) == 1.0


def test_binary_f1():
    # tp=2 (rows 0,2), fp=1 (row 3), fn=1 (row 1): P=2/3, R=2/3, F1=2/3
    assert compute_metric("f1", [1, 0, 1, 1, 0], [1, 1, 1, 0, 0]) == pytest.approx(2 / 3)
    # tp=1, fp=0, fn=2: P=1, R=1/3 -> F1 = 2*1*(1/3)/(4/3) = 0.5
    assert compute_metric("f1", [1, 0, 0], [1, 1, 1]) == pytest.approx(0.5)
    assert compute_metric("f1", [0, 0, 0], [0, 0, 0]) == 0.0          # no positives anywhere (sklearn: 0)
    assert compute_metric("f1", [1, 1, 1], [1, 1, 1]) == 1.0
    assert compute_metric("f1", [0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError, match="macro_f1"):
        compute_metric("f1", [0, 2], [0, 1])


def test_macro_f1():
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=0 -> 2/3; class 2: tp=1 fp=0 fn=0 -> 1
    p, y = [0, 1, 1, 2], [0, 0, 1, 2]
    assert compute_metric("macro_f1", p, y) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert compute_metric("macro_f1", [1, 1], [1, 1]) == 1.0           # only one class present


def test_matthews_corrcoef():
    # binary: tp=2 tn=1 fp=1 fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    p, y = [1, 0, 1, 1, 0], [1, 1, 1, 0, 0]
    assert compute_metric("matthews_corrcoef", p, y) == pytest.approx(1 / 6)
    assert compute_metric("matthews_corrcoef", [0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert compute_metric("matthews_corrcoef", [1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # all predictions one class: undefined -> 0.0 (as sklearn)
    assert compute_metric("matthews_corrcoef", [1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert compute_metric("matthews_corrcoef", [0, 0, 0], [0, 0, 0]) == 0.0
    # multi-class (Gorodkin): y=[0,1,2,0], p=[0,2,2,0]: c=3, s=4, t=(2,1,1), p=(2,0,2)
    # (3*4 - (4+0+2)) / sqrt((16 - (4+0+4)) * (16 - (4+1+1))) = 6 / sqrt(8*10)
    assert compute_metric("matthews_corrcoef", [0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(6 / math.sqrt(80))


def test_metric_input_checks():
    import numpy as np
    import torch

    assert compute_metric("accuracy", np.array([1, 0]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("auc", [0], [0])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        compute_metric("accuracy", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no examples"):
        compute_metric("accuracy", [], [])
    with pytest.raises(ValueError, match="integer"):
        compute_metric("accuracy", [0.5], [0])


def test_holdout_splits_one_file_the_same_way_every_time(tmp_path):
    rows = [{"text": f"row {i}", "label": "pos" if i < 30 else "neg"} for i in range(40)]  # sorted by label
    f = _jsonl(tmp_path / "all.jsonl", rows)
    spec = local_task("one_file", f, labels=("neg", "pos"), holdout=0.25)
    a, b = load_task(spec, seed=0), load_task(spec, seed=7)
    held = [e.text for e in a.eval]
    assert held == [e.text for e in b.eval]  # the load seed does not move the held-out rows
    assert len(held) == 10 and not set(held) & {e.text for e in a.train}
    assert sorted(held + [e.text for e in a.train]) == sorted(r["text"] for r in rows)
    counts = collections.Counter(e.label for e in a.eval)
    assert abs(counts[1] - 7.5) <= 0.5 and abs(counts[0] - 2.5) <= 0.5  # stratified: 30 pos / 10 neg
    assert T.spec_from_dict(T.spec_to_dict(spec)) == spec
    with pytest.raises(ValueError, match="leaves 0 to evaluate"):
        load_task(local_task("tiny_file", _jsonl(tmp_path / "two.jsonl", rows[:2]), labels=("neg", "pos"),
                             holdout=0.2))


def test_holdout_leaves_every_label_something_to_train_on(tmp_path):
    rows = [{"text": f"row {i}", "label": "pos"} for i in range(9)] + [{"text": "the only neg", "label": "neg"}]
    data = load_task(local_task("rare", _jsonl(tmp_path / "rare.jsonl", rows), labels=("neg", "pos"), holdout=0.2))
    assert "the only neg" in [e.text for e in data.train]
    assert data.eval and all(e.label == 1 for e in data.eval)
