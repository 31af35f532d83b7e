"""Drop-in modules against hand-sliced copies of the layers they wrap."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from doe_kernels import (GatheredGatedMLP, GatheredLinear, is_neuron_major, linear_weight, to_neuron_major_,
                         to_row_major_)
from kernel_utils import DEVICE, triton_runs

BACKENDS = ["torch"] + (["triton"] if triton_runs() else [])


def _idx(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _linear(n_in, n_out, seed, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_linear_rows_and_cols_match_sliced_layers(backend):
    up, down = _linear(24, 40, 0), _linear(40, 24, 1)
    idx = _idx([0, 3, 4, 10, 22, 39])
    x = torch.randn(2, 5, 24, device=DEVICE)
    g_up = GatheredLinear(up, idx, mode="rows", backend=backend)
    g_down = GatheredLinear(down, idx, mode="cols", backend=backend)
    li = idx.long()
    want = F.linear(F.gelu(F.linear(x, up.weight[li], up.bias[li])), down.weight[:, li], down.bias)
    torch.testing.assert_close(g_down(F.gelu(g_up(x))), want, atol=2e-4, rtol=2e-4)
    assert g_up.weight is up.weight and g_up.bias is up.bias  # shared, not copied
    assert "mode=rows, kept=6/40" in repr(g_up) and "mode=cols, kept=6/40" in repr(g_down)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_linear_wraps_conv1d(backend):
    torch.manual_seed(0)
    c_fc, c_proj = Conv1D(40, 24).to(DEVICE), Conv1D(24, 40).to(DEVICE)  # (nf, nx): weight (in, out)
    nn.init.normal_(c_fc.bias)
    idx = _idx([1, 2, 8, 30])
    x = torch.randn(3, 24, device=DEVICE)
    h = GatheredLinear(c_fc, idx, mode="rows", backend=backend)(x)
    y = GatheredLinear(c_proj, idx, mode="cols", backend=backend)(h)
    li = idx.long()
    want_h = x @ c_fc.weight[:, li] + c_fc.bias[li]
    torch.testing.assert_close(h, want_h, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(y, want_h @ c_proj.weight[li, :] + c_proj.bias, atol=2e-4, rtol=2e-4)
    assert linear_weight(c_fc).shape == (40, 24)


def test_set_indices_switches_and_validates():
    up = _linear(16, 20, 0)
    g = GatheredLinear(up, _idx([0, 1]), mode="rows", backend="torch")
    g.set_indices(_idx([5, 6, 7]))
    x = torch.randn(2, 16, device=DEVICE)
    torch.testing.assert_close(g(x), F.linear(x, up.weight[5:8], up.bias[5:8]))
    with pytest.raises(ValueError, match="index 20 out of range"):
        g.set_indices(_idx([3, 20]))
    assert g.indices.tolist() == [5, 6, 7]  # a failed switch leaves the old indices
    with pytest.raises(ValueError, match="mode: expected 'rows' or 'cols'"):
        GatheredLinear(up, _idx([0]), mode="up")
    with pytest.raises(TypeError, match="expected an nn.Linear or transformers Conv1D, got ReLU"):
        GatheredLinear(nn.ReLU(), _idx([0]), mode="rows")


def test_in_place_set_indices_keeps_the_buffer():
    up = _linear(16, 20, 0)
    g = GatheredLinear(up, _idx([0, 1, 2]), mode="rows", backend="torch")
    buffer = g.indices
    g.set_indices(_idx([4, 9, 11]), validated=True, in_place=True)
    assert g.indices is buffer and buffer.tolist() == [4, 9, 11]
    x = torch.randn(2, 16, device=DEVICE)
    li = torch.tensor([4, 9, 11], device=DEVICE)
    torch.testing.assert_close(g(x), F.linear(x, up.weight[li], up.bias[li]))
    with pytest.raises(ValueError, match="in-place switch needs 3 ids"):
        g.set_indices(_idx([1, 2]), in_place=True)
    with pytest.raises(ValueError, match="expected a validated 1-D int32 tensor"):
        g.set_indices(torch.tensor([1, 2, 3]), validated=True)  # int64: not what validation returns
    assert buffer.tolist() == [4, 9, 11]


def test_indices_buffer_is_not_in_state_dict():
    up = _linear(8, 12, 0)
    g = GatheredLinear(up, _idx([1, 2]), mode="rows")
    assert list(g.state_dict()) == ["weight", "bias"]
    assert [p for _, p in g.named_parameters()] == [up.weight, up.bias]


class _LlamaLikeMLP(nn.Module):
    def __init__(self, hidden, inter, act, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _sliced_mlp(mlp, idx):
    li = idx.long()
    out = _LlamaLikeMLP(mlp.gate_proj.in_features, len(li), mlp.act_fn, bias=mlp.gate_proj.bias is not None)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            getattr(out, name).weight.copy_(getattr(mlp, name).weight[li])
            if getattr(mlp, name).bias is not None:
                getattr(out, name).bias.copy_(getattr(mlp, name).bias[li])
        out.down_proj.weight.copy_(mlp.down_proj.weight[:, li])
        if mlp.down_proj.bias is not None:
            out.down_proj.bias.copy_(mlp.down_proj.bias)
    return out.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "callable-act"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gated_mlp_matches_sliced_block(backend, fused, bias):
    torch.manual_seed(0)
    mlp = _LlamaLikeMLP(24, 44, nn.SiLU(), bias=bias).to(DEVICE)
    idx = _idx([0, 2, 3, 7, 11, 19, 20, 43])
    block = GatheredGatedMLP(
        mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, idx,
        activation="silu" if fused else mlp.act_fn, backend=backend,
    )
    x = torch.randn(2, 3, 24, device=DEVICE)
    torch.testing.assert_close(block(x), _sliced_mlp(mlp, idx)(x), atol=2e-4, rtol=2e-4)
    assert "kept=8/44" in repr(block)
    assert list(block.state_dict()) == list(mlp.state_dict())  # the original block's keys


def test_gated_mlp_rejects_mismatched_shapes():
    mlp = _LlamaLikeMLP(24, 44, nn.SiLU())
    with pytest.raises(ValueError, match="gated FFN shapes disagree"):
        GatheredGatedMLP(mlp, mlp.gate_proj, nn.Linear(24, 40), mlp.down_proj, _idx([0]), activation="silu")
    with pytest.raises(TypeError, match="gate: expected nn.Linear, got ReLU"):
        GatheredGatedMLP(mlp, nn.ReLU(), mlp.up_proj, mlp.down_proj, _idx([0]), activation="silu")


def test_to_neuron_major_keeps_parameter_and_values():
    down = _linear(40, 24, 0)
    param, before = down.weight, down.weight.detach().clone()
    assert not is_neuron_major(down.weight, 1)
    assert to_neuron_major_(down.weight, 1)
    assert down.weight is param and torch.equal(down.weight, before)
    assert is_neuron_major(down.weight, 1) and down.weight.t().is_contiguous()
    assert not to_neuron_major_(down.weight, 1)  # idempotent
    x = torch.randn(3, 40, device=DEVICE)
    torch.testing.assert_close(down(x), F.linear(x, before, down.bias))
    assert to_row_major_(down.weight) and down.weight.is_contiguous() and torch.equal(down.weight, before)


def test_forward_still_rejects_inputs_and_weights_the_indices_do_not_fit():
    # The wrappers skip re-checking their own validated indices, not the rest of the metadata.
    idx = _idx([1, 4, 7])
    rows = GatheredLinear(_linear(8, 10, seed=0), idx, mode="rows", backend="torch")
    with pytest.raises(TypeError, match="dtype"):
        rows(torch.randn(2, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="last dimension"):
        rows(torch.randn(2, 9, device=DEVICE))
    rows.base_layer.weight = nn.Parameter(torch.randn(6, 8, device=DEVICE))
    rows.base_layer.bias = None
    with pytest.raises(ValueError, match="validated against 10 neurons"):
        rows(torch.randn(2, 8, device=DEVICE))
