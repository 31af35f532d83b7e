"""Expert folders (save_pretrained / from_pretrained), fingerprints, and top-k localization."""

import json

import pytest
import torch

import doe
from doe.attribution import NeuronScores
from doe.expert import CONFIG_NAME, WEIGHTS_NAME, model_fingerprint
from doe.localize import LocalizationConfig, localize
from doe.testing import random_expert_indices, sliced_copy
from tiny_models import make_tiny, model_logits, sample_inputs


def make_expert(family="bert", keep=0.35, seed=0):
    model = make_tiny(family)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, keep, seed=seed), task="toy",
                                         metadata={"note": "hand-made"})
    expert.prompt = torch.randn(4, 32)
    expert.head = {"weight": torch.randn(3, 32), "bias": torch.randn(3)}
    expert.dense_prompt = torch.randn(4, 32)
    expert.dense_head = {"weight": torch.randn(3, 32), "bias": torch.randn(3)}
    return model, expert


def test_round_trip_keeps_everything(tmp_path):
    model, expert = make_expert()
    expert.save_pretrained(tmp_path / "e")
    config = json.loads((tmp_path / "e" / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["model_type"] == "bert" and config["task"] == "toy"
    assert config["fingerprint"] == model_fingerprint(model) and config["kept"] == expert.kept
    assert config["doe_version"] == doe.__version__
    loaded = doe.TaskExpert.from_pretrained(tmp_path / "e")
    assert [torch.equal(a, b) for a, b in zip(loaded.indices, expert.indices)] == [True] * expert.num_blocks
    assert loaded.indices[0].dtype == torch.int32
    assert torch.equal(loaded.prompt, expert.prompt)
    assert all(torch.equal(loaded.head[k], expert.head[k]) for k in expert.head)
    assert torch.equal(loaded.dense_prompt, expert.dense_prompt)
    assert all(torch.equal(loaded.dense_head[k], expert.dense_head[k]) for k in expert.dense_head)
    assert loaded.metadata == expert.metadata and loaded.fingerprint == expert.fingerprint
    inputs = sample_inputs(model)
    with doe.unplugged(model, loaded):
        got = model_logits(model, inputs)
    torch.testing.assert_close(got, model_logits(sliced_copy(model, expert.indices), inputs), atol=1e-4, rtol=1e-4)


def test_fingerprint_separates_models_and_blocks_unplug():
    model, expert = make_expert("llama")
    assert model_fingerprint(make_tiny("llama", seed=5)) == model_fingerprint(model)  # same config, new weights
    other = make_tiny("mistral")
    assert model_fingerprint(other) != model_fingerprint(model)
    expert.model_type = None  # only the fingerprint can tell now
    bigger_vocab = make_tiny("llama")
    bigger_vocab.config.vocab_size += 1
    with pytest.raises(ValueError, match="was built for a model with fingerprint"):
        doe.unplug_(bigger_vocab, expert)
    assert not doe.is_unplugged(bigger_vocab)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate-weights", "truncated or corrupted safetensors"),
        ("garbage-config", "corrupted expert config"),
        ("missing-weights", "expert.safetensors is missing"),
        ("future-version", "expected format_version 1, got 99"),
        ("kept-mismatch", "disagree with the config"),
        ("index-out-of-range", "31 indices for only 8 neurons"),
    ],
)
def test_damaged_folders_fail_clearly(tmp_path, damage, message):
    _, expert = make_expert()
    folder = expert.save_pretrained(tmp_path / "e")
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    config = json.loads(config_path.read_text())
    if damage == "truncate-weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage-config":
        config_path.write_text("{not json")
    elif damage == "missing-weights":
        weights.unlink()
    elif damage == "future-version":
        config_path.write_text(json.dumps({**config, "format_version": 99}))
    elif damage == "kept-mismatch":
        config_path.write_text(json.dumps({**config, "kept": [1] * len(config["kept"])}))
    elif damage == "index-out-of-range":
        config_path.write_text(json.dumps({**config, "num_neurons": [8] * len(config["num_neurons"])}))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        doe.TaskExpert.from_pretrained(folder)


def _scores(per_layer):
    return NeuronScores([torch.tensor(s, dtype=torch.float32) for s in per_layer], [1.0] * len(per_layer))


def test_localize_per_layer_keeps_top_scores():
    model = make_tiny("bert")
    n = doe.find_ffn_blocks(model)[0].num_neurons
    g = torch.Generator().manual_seed(0)
    raw = [torch.rand(n, generator=g) for _ in range(2)]
    expert = localize(model, _scores([r.tolist() for r in raw]), LocalizationConfig(keep_ratio=0.25, scope="layer"))
    for r, idx in zip(raw, expert.indices):
        k = idx.numel()
        assert k == -(-n // 4)  # ceil(0.25 * n)
        assert set(idx.tolist()) == set(torch.topk(r, k).indices.tolist())
    assert expert.metadata["localization"]["keep_ratio"] == 0.25


def test_localize_global_and_rounding():
    model = make_tiny("bert")
    n = doe.find_ffn_blocks(model)[0].num_neurons
    hot, cold = [1.0 + i / n for i in range(n)], [0.0] * n
    hot[0] = 0.0
    expert = localize(model, _scores([hot, cold]), LocalizationConfig(keep_ratio=0.5, scope="global"))
    assert expert.kept[0] >= n - 1  # the block with the high scores takes the budget
    assert expert.kept[1] == 1  # every block keeps at least min_per_layer neurons
    rounded = localize(model, _scores([hot, hot]), LocalizationConfig(keep_ratio=0.35, multiple_of=16))
    assert all(k % 16 == 0 and k <= n for k in rounded.kept)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_ratio=0.0), r"keep_ratio: expected a fraction in \(0, 1\]"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(scope="model"), "scope: expected 'layer' or 'global'"),
        (dict(multiple_of=0), "multiple_of"),
    ],
)
def test_localization_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalizationConfig(**kwargs)


def test_an_expert_carries_its_task_and_loading_registers_nothing(tmp_path):
    from doe.tasks import TASKS, TaskSpec, spec_to_dict

    model = make_tiny("bert")
    folders = {}
    for labels in (("no", "yes"), ("low", "mid", "high")):  # two local tasks with one name
        spec = TaskSpec(name="local_grade", labels=labels, dataset="json", data_files={"train": "unused.jsonl"})
        expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=len(labels)),
                                             task="local_grade", metadata={"task_spec": spec_to_dict(spec)})
        folders[labels] = expert.save_pretrained(tmp_path / f"e{len(labels)}")
    before = dict(TASKS)
    loaded = {labels: doe.TaskExpert.from_pretrained(f) for labels, f in folders.items()}
    assert dict(TASKS) == before and "local_grade" not in TASKS
    for labels, expert in loaded.items():  # each keeps its own labels: the second did not overwrite the first
        assert expert.spec().labels == labels and expert.spec().name == "local_grade"

    config_path = folders[("no", "yes")] / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["metadata"]["task_spec"]["name"] = "another_task"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="task_spec is named 'another_task', the expert's task is 'local_grade'"):
        doe.TaskExpert.from_pretrained(folders[("no", "yes")])
    assert dict(TASKS) == before


def test_prompt_and_head_fall_back_between_expert_and_dense():
    model = make_tiny("bert")
    idx = random_expert_indices(model, 0.35, seed=0)
    p, dp = torch.randn(4, 32), torch.randn(4, 32)
    h, dh = {"w": torch.randn(2, 32)}, {"w": torch.randn(2, 32)}
    both = doe.TaskExpert.from_indices(model, idx, task="t")
    both.prompt, both.head, both.dense_prompt, both.dense_head = p, h, dp, dh
    assert both.prompt_and_head() == (p, h) and both.prompt_and_head(on_expert=False) == (dp, dh)
    only_dense = doe.TaskExpert.from_indices(model, idx, task="t")
    only_dense.dense_prompt, only_dense.dense_head = dp, dh
    assert only_dense.prompt_and_head() == (dp, dh) == only_dense.prompt_and_head(on_expert=False)
    only_own = doe.TaskExpert.from_indices(model, idx, task="t")
    only_own.prompt = p
    assert only_own.prompt_and_head(on_expert=False) == (p, None)


def test_summary_totals_what_the_folder_config_lists(tmp_path):
    model = make_tiny("llama")
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=3), task="t",
                                         metadata={"method": "random"})
    config = json.loads((expert.save_pretrained(tmp_path / "e") / CONFIG_NAME).read_text())
    s = expert.summary()
    assert s["kept"] == sum(config["kept"]) and s["num_neurons"] == sum(config["num_neurons"])
    assert s["keep_ratio"] == pytest.approx(s["kept"] / s["num_neurons"]) and s["blocks"] == len(config["kept"])
    assert (s["task"], s["method"], s["fingerprint"], s["prompt_tokens"]) == ("t", "random", config["fingerprint"], None)
    assert json.loads(json.dumps(s)) == s
