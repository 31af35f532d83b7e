"""Bad input gets a clear error naming what was expected and what arrived."""

import pytest
import torch

from doe_kernels import gathered_glu, gathered_linear, resolve_backend, use_backend, validate_indices


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([0, 5, 10]), r"index 10 out of range, expected values in \[0, 10\)"),
        (torch.tensor([-1, 2]), r"index -1 out of range"),
        (torch.tensor([1, 3, 3, 4]), r"duplicated index 3 at position 2"),
        (torch.tensor([1, 4, 2]), r"expected indices sorted ascending, got 4 before 2"),
        (torch.tensor([], dtype=torch.long), r"expected at least one kept neuron out of 10"),
        (torch.tensor([[1, 2]]), r"expected a 1-D tensor, got shape \(1, 2\)"),
        (torch.tensor([1.0, 2.0]), r"expected int32 or int64 indices, got torch.float32"),
        (torch.arange(11), r"11 indices for only 10 neurons"),
    ],
    ids=["too-large", "negative", "duplicate", "unsorted", "empty", "2d", "float", "too-many"],
)
def test_validate_indices_rejects(indices, message):
    with pytest.raises((ValueError, TypeError), match=message):
        validate_indices(indices, 10)


def test_validate_indices_returns_int32_copy():
    idx = torch.tensor([0, 4, 9], dtype=torch.int64)
    out = validate_indices(idx, 10)
    assert out.dtype == torch.int32 and out.tolist() == [0, 4, 9]
    assert validate_indices([1, 2], 5).tolist() == [1, 2]


W = torch.randn(20, 16)
X = torch.randn(3, 16)
IDX = torch.tensor([1, 5, 7], dtype=torch.int32)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: gathered_linear(X, W), ValueError, "exactly one of rows= .* got neither"),
        (lambda: gathered_linear(X, W, rows=IDX, cols=IDX), ValueError, "got both"),
        (lambda: gathered_linear(X, W, rows=IDX.float()), TypeError, "rows: expected int32 or int64"),
        (lambda: gathered_linear(X, W, rows=IDX[None]), ValueError, r"rows: expected a 1-D index tensor"),
        (lambda: gathered_linear(torch.randn(3, 15), W, rows=IDX), ValueError,
         r"x: expected last dimension 16 \(weight.shape\[1\] = 16\), got shape \(3, 15\)"),
        (lambda: gathered_linear(X, W, cols=IDX), ValueError, r"expected last dimension 3 \(len\(cols\) = 3\)"),
        (lambda: gathered_linear(X.half(), W, rows=IDX), TypeError, "x is torch.float16 but weight is torch.float32"),
        (lambda: gathered_linear(X.to("meta"), W, rows=IDX), ValueError, "x is on meta but weight is on cpu"),
        (lambda: gathered_linear(X, W, torch.randn(19), rows=IDX), ValueError, r"bias: expected shape \(20,\)"),
        (lambda: gathered_linear(X, W[0], rows=IDX), ValueError, "expected a 2-D"),
        (lambda: gathered_linear(X, W, rows=IDX, backend="cuda"), ValueError, "backend: expected one of"),
        (lambda: gathered_glu(X, W, W[:10], rows=IDX), ValueError, "must have one shape"),
        (lambda: gathered_glu(X, W, W, rows=IDX, activation="tanh"), ValueError, "activation: expected one of"),
        (lambda: gathered_glu(X, W, W, rows=IDX, gate_bias=torch.randn(20).half()), TypeError, "gate_bias: expected"),
        (lambda: gathered_glu(X, W, W, IDX), TypeError, "positional argument"),
        (lambda: gathered_linear(X, W, None, IDX), TypeError, "positional argument"),
    ],
    ids=[
        "no-index", "both-indices", "float-index", "2d-index", "x-features", "cols-features", "dtype-mismatch",
        "device-mismatch", "bias-shape", "weight-1d", "bad-backend", "glu-shapes", "glu-activation", "glu-bias",
        "glu-rows-positional", "linear-index-positional",
    ],
)
def test_op_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs Triton's interpreter"):
        resolve_backend("triton", X)


def test_auto_resolution(monkeypatch):
    assert resolve_backend("auto", X) == "torch"
    monkeypatch.setenv("DOE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", X) == "triton"
    with use_backend("torch"):
        assert resolve_backend("auto", X) == "torch"
    assert resolve_backend("auto", X) == "triton"
