"""Architecture registry: FFN discovery on every supported family, custom specs, errors, and the
hand-sliced reference model of tests/tiny_models.py."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

import doe.architectures as arch
from doe.architectures import (
    SUPPORTED_MODEL_TYPES,
    FFNBlock,
    FFNSpec,
    activation_name,
    find_ffn_blocks,
    get_ffn_specs,
    register_architecture,
)
from doe.testing import sliced_copy
from doe_kernels.testing import random_indices
from tiny_models import (
    FAMILIES,
    HIDDEN,
    INTERMEDIATE,
    make_config,
    make_tiny,
    model_logits,
    sample_inputs,
)

# family -> (head-model block names, container class, up, down, gate, kind, activation)
ENC, DEC = "encoder.block.{i}.layer.1.DenseReluDense", "decoder.block.{i}.layer.2.DenseReluDense"
EXPECTED = {
    "bert": (["bert.encoder.layer.{i}"], "BertLayer", "intermediate.dense", "output.dense", None, "linear", None),
    "roberta": (["roberta.encoder.layer.{i}"], "RobertaLayer", "intermediate.dense", "output.dense", None, "linear", None),
    "distilbert": (["distilbert.transformer.layer.{i}.ffn"], "FFN", "lin1", "lin2", None, "linear", None),
    "gpt2": (["transformer.h.{i}.mlp"], "GPT2MLP", "c_fc", "c_proj", None, "conv1d", None),
    "opt": (["model.decoder.layers.{i}"], "OPTDecoderLayer", "fc1", "fc2", None, "linear", None),
    "llama": (["model.layers.{i}.mlp"], "LlamaMLP", "up_proj", "down_proj", "gate_proj", "linear", "silu"),
    "mistral": (["model.layers.{i}.mlp"], "MistralMLP", "up_proj", "down_proj", "gate_proj", "linear", "silu"),
    "qwen2": (["model.layers.{i}.mlp"], "Qwen2MLP", "up_proj", "down_proj", "gate_proj", "linear", "silu"),
    "gemma": (["model.layers.{i}.mlp"], "GemmaMLP", "up_proj", "down_proj", "gate_proj", "linear", "gelu_tanh"),
    "t5": ([ENC, DEC], "T5DenseActDense", "wi", "wo", None, "linear", None),
    "t5-gated": ([ENC, DEC], "T5DenseGatedActDense", "wi_1", "wo", "wi_0", "linear", "gelu_tanh"),
}
HEAD_PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.", "gpt2": "transformer.",
               "opt": "model.", "llama": "model.", "mistral": "model.", "qwen2": "model.", "gemma": "model."}


def expected_names(family: str) -> list[str]:
    return [pattern.format(i=i) for pattern in EXPECTED[family][0] for i in range(2)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return request.param, make_tiny(request.param)


# --------------------------------------------------------------------------------------------
# Built-in families
# --------------------------------------------------------------------------------------------


def test_families_cover_registry():
    assert set(SUPPORTED_MODEL_TYPES) == {f for f in FAMILIES if f != "t5-gated"}
    assert set(EXPECTED) == set(FAMILIES)


def test_find_blocks(tiny):
    family, model = tiny
    _, container_cls, up, down, gate, kind, activation = EXPECTED[family]
    blocks = find_ffn_blocks(model)
    assert [b.name for b in blocks] == expected_names(family)
    assert len(blocks) == (4 if family.startswith("t5") else 2)
    for b in blocks:
        assert isinstance(b, FFNBlock)
        assert b.container is model.get_submodule(b.name)
        assert type(b.container).__name__ == container_cls
        assert (b.up_name, b.down_name, b.gate_name) == (up, down, gate)
        assert b.up is model.get_submodule(f"{b.name}.{up}")
        assert b.down is model.get_submodule(f"{b.name}.{down}")
        assert b.kind == kind
        assert isinstance(b.up, Conv1D if kind == "conv1d" else nn.Linear)
        assert (b.num_neurons, b.hidden_size) == (INTERMEDIATE, HIDDEN)
        assert b.gated == (gate is not None)
        assert b.activation == activation
        if gate is None:
            assert b.gate is None and b.act_module is None and b.dropout is None
        else:
            assert b.gate is model.get_submodule(f"{b.name}.{gate}")
            assert b.act_module is not None and activation_name(b.act_module) == activation
            assert (b.dropout is not None) == family.startswith("t5")
    # the repr stays one line per block (no module trees)
    assert "\n" not in repr(blocks[0])


def test_find_blocks_base_model(tiny):
    family, _ = tiny
    base = make_tiny(family, head=False)
    names = [b.name for b in find_ffn_blocks(base)]
    prefix = HEAD_PREFIX.get(family, "")
    assert names == [n[len(prefix):] for n in expected_names(family)]


def test_bert_base_and_head_share_blocks():
    head = make_tiny("bert")
    base = make_tiny("bert", head=False)
    assert isinstance(head, tf.BertForSequenceClassification) and isinstance(base, tf.BertModel)
    assert [b.name for b in find_ffn_blocks(head)] == ["bert." + b.name for b in find_ffn_blocks(base)]
    assert [b.name for b in find_ffn_blocks(head.bert)] == [b.name for b in find_ffn_blocks(base)]


@pytest.mark.parametrize("family", ["t5", "t5-gated"])
def test_t5_spec_follows_config(family):
    specs = get_ffn_specs(make_config(family))
    assert len(specs) == 1
    assert specs[0].gated == (family == "t5-gated")
    assert specs[0].dropout == ("dropout" if family == "t5-gated" else None)


def test_get_ffn_specs_accepts_model_and_config():
    model = make_tiny("llama")
    assert get_ffn_specs(model) == get_ffn_specs(model.config)
    assert get_ffn_specs(model)[0] == FFNSpec(r"layers\.\d+\.mlp", up="up_proj", down="down_proj",
                                              gate="gate_proj", act="act_fn")


# --------------------------------------------------------------------------------------------
# Unknown families, custom specs, registration
# --------------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported():
    config = tf.GPTNeoXConfig()
    with pytest.raises(ValueError) as info:
        get_ffn_specs(config)
    msg = str(info.value)
    assert "'gpt_neox'" in msg
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in msg
    assert "FFNSpec(" in msg and "register_architecture(" in msg and "gate=" in msg


def test_model_without_config_needs_a_spec():
    with pytest.raises(TypeError, match="FFNSpec"):
        find_ffn_blocks(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))


class Toy(nn.Module):
    """A toy transformer-ish stack: blocks.N.ffn is Sequential(fc1, act, fc2)."""

    def __init__(self, hidden=12, inter=20, layers=3, down_in=None):
        super().__init__()
        self.embed = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm": nn.LayerNorm(hidden),
                "ffn": nn.Sequential(OrderedDict(
                    fc1=nn.Linear(hidden, inter), act=nn.GELU(), fc2=nn.Linear(down_in or inter, hidden))),
            })
            for _ in range(layers)
        )

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["ffn"](block["norm"](x))
        return x


class GatedToy(nn.Module):
    """A gated FFN whose activation is a plain function attribute."""

    def __init__(self, hidden=12, inter=20, gate_out=None, bias=True):
        super().__init__()
        self.w_gate = nn.Linear(hidden, gate_out or inter, bias=bias)
        self.w_up = nn.Linear(hidden, inter, bias=bias)
        self.w_down = nn.Linear(inter, hidden, bias=bias)
        self.act = F.silu

    def forward(self, x):
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


TOY_SPEC = FFNSpec(block_pattern=r"blocks\.\d+\.ffn", up="fc1", down="fc2")
GATED_TOY_SPEC = FFNSpec(block_pattern=r"ffn\.\d+", up="w_up", down="w_down", gate="w_gate", act="act")


def test_custom_spec_on_toy_module():
    torch.manual_seed(0)
    toy = Toy()
    blocks = find_ffn_blocks(toy, TOY_SPEC)
    assert [b.name for b in blocks] == ["blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn"]
    assert all((b.num_neurons, b.hidden_size, b.kind, b.gated) == (20, 12, "linear", False) for b in blocks)
    assert blocks[1].up is toy.blocks[1]["ffn"].fc1
    # children of a plain Sequential are reachable by index
    seq = nn.Module()
    seq.mlps = mlp = nn.ModuleList([nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12)) for _ in range(2)])
    by_index = find_ffn_blocks(seq, FFNSpec(r"mlps\.\d+", up="0", down="2"))
    assert [(b.name, b.up, b.down) for b in by_index] == [("mlps.0", mlp[0][0], mlp[0][2]), ("mlps.1", mlp[1][0], mlp[1][2])]
    # sliced reference works with a user spec too
    sliced = sliced_copy(toy, [torch.arange(0, 20, 2)] * 3, spec=TOY_SPEC)
    assert sliced.blocks[0]["ffn"].fc1.out_features == 10
    assert sliced(torch.randn(2, 12)).shape == (2, 12)


def test_custom_gated_spec_with_function_activation():
    model = nn.Module()
    model.ffn = nn.ModuleList([GatedToy(), GatedToy()])
    blocks = find_ffn_blocks(model, GATED_TOY_SPEC)
    assert [b.name for b in blocks] == ["ffn.0", "ffn.1"]
    b = blocks[0]
    assert b.gated and b.gate is model.ffn[0].w_gate and b.activation == "silu"
    x = torch.randn(3, 12)
    assert torch.equal(b.act_module(x), F.silu(x))


def test_several_specs():
    model = nn.Module()
    model.dense = Toy(layers=1)
    model.gated = nn.ModuleList([GatedToy()])
    blocks = find_ffn_blocks(model, [TOY_SPEC, FFNSpec(r"gated\.\d+", up="w_up", down="w_down", gate="w_gate")])
    assert [(b.name, b.gated) for b in blocks] == [("dense.blocks.0.ffn", False), ("gated.0", True)]
    assert blocks[1].activation is None and blocks[1].act_module is None  # no act path given


def test_register_architecture(monkeypatch):
    monkeypatch.setattr(arch, "_REGISTRY", dict(arch._REGISTRY))
    monkeypatch.setattr(arch, "SUPPORTED_MODEL_TYPES", arch.SUPPORTED_MODEL_TYPES)
    toy = Toy()
    toy.config = SimpleNamespace(model_type="toy")
    with pytest.raises(ValueError, match="Unsupported model_type 'toy'"):
        find_ffn_blocks(toy)
    register_architecture("toy", TOY_SPEC)
    assert "toy" in arch.SUPPORTED_MODEL_TYPES
    assert len(find_ffn_blocks(toy)) == 3
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("toy", [TOY_SPEC])
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("bert", TOY_SPEC)
    register_architecture("toy", [FFNSpec(r"blocks\.0\.ffn", up="fc1", down="fc2")], overwrite=True)
    assert [b.name for b in find_ffn_blocks(toy)] == ["blocks.0.ffn"]
    with pytest.raises(TypeError, match="FFNSpec"):
        register_architecture("toy2", {"up": "fc1"})
    with pytest.raises(TypeError, match="FFNSpec"):
        register_architecture("toy2", [])
    with pytest.raises(ValueError, match="model_type"):
        register_architecture("", TOY_SPEC)


# --------------------------------------------------------------------------------------------
# Bad specs and mismatched models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(block_pattern=r"layers\.(\d+", up="a", down="b"), "not a valid regular expression", id="bad-regex"),
        pytest.param(dict(block_pattern="", up="a", down="b"), "block_pattern", id="empty-pattern"),
        pytest.param(dict(block_pattern="x", up="", down="b"), "FFNSpec.up", id="empty-up"),
        pytest.param(dict(block_pattern="x", up="a", down=None), "FFNSpec.down", id="none-down"),
        pytest.param(dict(block_pattern="x", up="a..b", down="c"), "dotted module path", id="bad-path"),
        pytest.param(dict(block_pattern="x", up="a", down="b", gate=""), "FFNSpec.gate", id="empty-gate"),
        pytest.param(dict(block_pattern="x", up="a", down="b", act="act"), "only meaningful for gated", id="act-without-gate"),
        pytest.param(dict(block_pattern="x", up="a", down="a"), "different modules", id="up-is-down"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FFNSpec(**kwargs)


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        TOY_SPEC.up = "fc2"


@pytest.fixture(scope="module")
def bert():
    return make_tiny("bert")


def test_no_block_matched(bert):
    with pytest.raises(ValueError) as info:
        find_ffn_blocks(bert, FFNSpec(r"layers\.\d+\.mlp", up="up_proj", down="down_proj"))
    msg = str(info.value)
    assert r"layers\.\d+\.mlp" in msg and "bert.embeddings" in msg


def test_missing_path(bert):
    spec = FFNSpec(r"encoder\.layer\.\d+", up="intermediate.dens", down="output.dense")
    with pytest.raises(ValueError, match=r"up path 'intermediate.dens' not found.*'dense'"):
        find_ffn_blocks(bert, spec)
    spec = FFNSpec(r"encoder\.layer\.\d+", up="intermediate.dense", down="output.dense", gate="gate", act="act")
    with pytest.raises(ValueError, match=r"gate path 'gate' not found.*'intermediate'"):
        find_ffn_blocks(bert, spec)


def test_projection_not_linear(bert):
    spec = FFNSpec(r"encoder\.layer\.\d+", up="intermediate.dense", down="output.LayerNorm")
    with pytest.raises(TypeError, match=r"down projection .*output\.LayerNorm' is a LayerNorm; expected torch\.nn\.Linear"):
        find_ffn_blocks(bert, spec)


def test_nested_matches_rejected(bert):
    spec = FFNSpec(r"encoder\.layer\.\d+(?:\.output)?", up="intermediate.dense", down="output.dense")
    with pytest.raises(ValueError, match="inside the block 'bert.encoder.layer.0'"):
        find_ffn_blocks(bert, spec)


def test_spec_argument_type(bert):
    with pytest.raises(TypeError, match="FFNSpec"):
        find_ffn_blocks(bert, "encoder.layer")
    with pytest.raises(TypeError, match="nn.Module"):
        find_ffn_blocks(bert.config)


def test_shape_mismatch_down_in():
    with pytest.raises(ValueError, match="takes 19 input features but up projection 'fc1' produces 20"):
        find_ffn_blocks(Toy(down_in=19), TOY_SPEC)


def test_shape_mismatch_gate():
    model = nn.Module()
    model.ffn = nn.ModuleList([GatedToy(gate_out=21)])
    with pytest.raises(ValueError, match="gate projection 'w_gate' maps 12 -> 21"):
        find_ffn_blocks(model, GATED_TOY_SPEC)


def test_shape_mismatch_hidden():
    model = nn.Module()
    model.ffn = nn.ModuleList([GatedToy()])
    model.ffn[0].w_down = nn.Linear(20, 13)
    with pytest.raises(ValueError, match="produces 13 features but up projection 'w_up' takes 12"):
        find_ffn_blocks(model, GATED_TOY_SPEC)


def test_mixed_kinds_rejected():
    toy = Toy()
    toy.blocks[0]["ffn"].fc1 = Conv1D(20, 12)
    with pytest.raises(TypeError, match="mix module kinds"):
        find_ffn_blocks(toy, TOY_SPEC)


# --------------------------------------------------------------------------------------------
# Activation recognition
# --------------------------------------------------------------------------------------------

_REFERENCE = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
ACTIVATIONS = [
    ("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_python", "gelu"),
    ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_python_tanh", "gelu_tanh"),
    ("gelu_fast", "gelu_tanh"), ("gelu_accurate", "gelu_tanh"), ("relu", "relu"),
    ("quick_gelu", None), ("gelu_10", None), ("mish", None), ("relu2", None), ("relu6", None), ("linear", None),
]


@pytest.mark.parametrize("key, expected", ACTIVATIONS, ids=[f"ACT2FN[{k}]" for k, _ in ACTIVATIONS])
def test_activation_name_hf(key, expected):
    if key not in ACT2FN:
        pytest.skip(f"ACT2FN has no {key!r} in this transformers version")
    act = ACT2FN[key]
    assert activation_name(act) == expected
    if expected is not None:  # recognised means: the same function (up to rounding)
        x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
        torch.testing.assert_close(act(x), _REFERENCE[expected](x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "act, expected",
    [
        pytest.param(nn.SiLU(), "silu", id="nn.SiLU"),
        pytest.param(nn.GELU(), "gelu", id="nn.GELU"),
        pytest.param(nn.GELU(approximate="tanh"), "gelu_tanh", id="nn.GELU-tanh"),
        pytest.param(nn.ReLU(inplace=True), "relu", id="nn.ReLU"),
        pytest.param(nn.Tanh(), None, id="nn.Tanh"),
        pytest.param(F.silu, "silu", id="F.silu"),
        pytest.param(torch.sigmoid, None, id="torch.sigmoid"),
        pytest.param(type("MySiLU", (nn.SiLU,), {"forward": lambda self, x: x})(), None, id="SiLU-subclass"),
    ],
)
def test_activation_name_torch(act, expected):
    assert activation_name(act) == expected


# --------------------------------------------------------------------------------------------
# Tiny models and the sliced reference
# --------------------------------------------------------------------------------------------


def test_make_tiny_is_deterministic():
    a, b, c = make_tiny("llama", seed=0), make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert not a.training and INTERMEDIATE % 16 != 0


def test_sample_inputs(tiny):
    family, model = tiny
    inputs = sample_inputs(model)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (2, 7)
    assert inputs["attention_mask"][0].all() and inputs["attention_mask"][1].tolist() == [1] * 5 + [0] * 2
    assert ("decoder_input_ids" in inputs) == family.startswith("t5")
    assert torch.equal(inputs["input_ids"], sample_inputs(model)["input_ids"])
    assert torch.isfinite(model_logits(model, inputs)).all()


def test_sliced_copy_keep_all_is_exact(tiny):
    family, model = tiny
    inputs = sample_inputs(model)
    n = len(find_ffn_blocks(model))
    sliced = sliced_copy(model, [torch.arange(INTERMEDIATE)] * n)
    for b in find_ffn_blocks(sliced):
        assert b.up is not model.get_submodule(f"{b.name}.{b.up_name}")  # new modules, not shared
    assert torch.equal(model_logits(sliced, inputs), model_logits(model, inputs))


def _random_indices(n_blocks: int, keep: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [random_indices(INTERMEDIATE, keep, generator=gen) for _ in range(n_blocks)]


def _masked_copy(model: nn.Module, indices: list[torch.Tensor]) -> nn.Module:
    """Same function as the sliced model, built differently: zero the dropped neurons' down weights."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for b, idx in zip(find_ffn_blocks(masked), indices):
            drop = torch.ones(b.num_neurons, dtype=torch.bool)
            drop[idx] = False
            if b.kind == "conv1d":
                b.down.weight[drop, :] = 0
            else:
                b.down.weight[:, drop] = 0
    return masked


def test_sliced_copy_random_subset(tiny):
    family, model = tiny
    original = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = find_ffn_blocks(model)
    keep = 31
    indices = _random_indices(len(blocks), keep)
    sliced = sliced_copy(model, indices)

    sliced_blocks = find_ffn_blocks(sliced)
    assert [b.name for b in sliced_blocks] == [b.name for b in blocks]
    for b, s, idx in zip(blocks, sliced_blocks, indices):
        assert (s.num_neurons, s.hidden_size, s.kind) == (keep, HIDDEN, b.kind)
        rows = (lambda w: w[:, idx]) if b.kind == "conv1d" else (lambda w: w[idx, :])
        cols = (lambda w: w[idx, :]) if b.kind == "conv1d" else (lambda w: w[:, idx])
        pairs = [(s.up, b.up, rows), (s.down, b.down, cols)] + ([(s.gate, b.gate, rows)] if b.gated else [])
        for new, old, take in pairs:
            assert torch.equal(new.weight, take(old.weight))
            assert new.weight.is_contiguous()
        if b.up.bias is not None:
            assert torch.equal(s.up.bias, b.up.bias[idx])
            assert torch.equal(s.down.bias, b.down.bias)
        assert s.container is not b.container

    # the original is untouched
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # the sliced model computes what the original computes without the dropped neurons
    inputs = sample_inputs(model)
    out = model_logits(sliced, inputs)
    assert out.shape == model_logits(model, inputs).shape
    torch.testing.assert_close(out, model_logits(_masked_copy(model, indices), inputs), atol=1e-5, rtol=1e-5)


def test_sliced_copy_padded_to_16_adds_zero_neurons_and_computes_the_same(tiny):
    family, model = tiny
    blocks = find_ffn_blocks(model)
    indices = _random_indices(len(blocks), 31)
    plain, padded = sliced_copy(model, indices), sliced_copy(model, indices, pad_to=16)
    for b, s, p in zip(blocks, find_ffn_blocks(plain), find_ffn_blocks(padded)):
        assert (p.num_neurons, p.kind) == (32, b.kind)
        rows = (lambda w, a, z: w[:, a:z]) if b.kind == "conv1d" else (lambda w, a, z: w[a:z, :])
        cols = (lambda w, a, z: w[a:z, :]) if b.kind == "conv1d" else (lambda w, a, z: w[:, a:z])
        pairs = [(p.up, s.up, rows), (p.down, s.down, cols)] + ([(p.gate, s.gate, rows)] if b.gated else [])
        for pad, ref, take in pairs:
            assert torch.equal(take(pad.weight, 0, 31), ref.weight)
            assert not take(pad.weight, 31, 32).any()
            assert pad.weight.is_contiguous()
        if b.up.bias is not None:
            assert torch.equal(p.up.bias[:31], s.up.bias) and p.up.bias[31] == 0
            assert torch.equal(p.down.bias, s.down.bias)
    inputs = sample_inputs(model)
    torch.testing.assert_close(model_logits(padded, inputs), model_logits(plain, inputs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pad_to: expected a positive int, got 0"):
        sliced_copy(model, indices, pad_to=0)


def test_sliced_copy_checks_block_count(bert):
    with pytest.raises(ValueError, match="expected 2 index lists"):
        sliced_copy(bert, [torch.arange(4)])


def test_sliced_copy_keeps_dtype_and_runs_generate():
    model = make_tiny("gpt2", dtype=torch.bfloat16)
    sliced = sliced_copy(model, _random_indices(2, 17))
    blocks = find_ffn_blocks(sliced)
    assert all(b.up.weight.dtype == torch.bfloat16 and b.up.nf == 17 for b in blocks)
    inputs = sample_inputs(model, batch=1, seq=4)
    out = sliced.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7) and math.isfinite(float(model_logits(sliced, inputs).float().sum()))
