"""torch.compile and CUDA graphs over unplugged models (the gathered ops are torch.library ops).

References: the eager unplugged model and hand-sliced copies (doe.testing.sliced_copy). Compiles use the aot_eager backend on CPU (dynamo +
AOTAutograd + the ops' fake implementations, without inductor's code generation time) and
inductor on CUDA.
"""

import pytest
import torch

import doe
from doe.testing import gathered_wrappers, random_expert_indices, sliced_copy
from kernel_utils import triton_runs
from tiny_models import make_tiny, model_logits, sample_inputs

BACKENDS = ["torch"] + (["triton"] if triton_runs() else [])
COMPILER = "inductor" if torch.cuda.is_available() else "aot_eager"


def expert_for(model, keep, seed):
    return doe.TaskExpert.from_indices(model, random_expert_indices(model, keep, seed), task=f"t{seed}")


def counter():
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(COMPILER)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fullgraph_compile_equals_eager_with_no_graph_break(family, backend):
    model = make_tiny(family)
    inputs = sample_inputs(model)
    expert = expert_for(model, 0.35, seed=0)
    want = model_logits(sliced_copy(model, expert.indices), inputs)
    doe.unplug_(model, expert, backend=backend)
    eager = model_logits(model, inputs)
    torch.testing.assert_close(eager, want, atol=1e-4, rtol=1e-4)

    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    torch._dynamo.reset()
    cnt = counter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    torch.testing.assert_close(model_logits(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_switch_reuses_the_compiled_graph_when_sizes_match(backend):
    # A switch rebinds each wrapper's index buffer to the new expert's (same-shaped) tensor.
    # Buffers are graph inputs, so the compiled graph is reused: no recompile, new results.
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    a, b = expert_for(model, 0.35, seed=1), expert_for(model, 0.35, seed=2)
    want_b = model_logits(sliced_copy(model, b.indices), inputs)
    doe.unplug_(model, a, backend=backend)
    cnt = counter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    got_a = model_logits(compiled, inputs)
    doe.unplug_(model, b, backend=backend)
    got_b = model_logits(compiled, inputs)
    assert cnt.frame_count == 1
    torch.testing.assert_close(got_b, want_b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got_a, got_b, atol=1e-3)


def test_expert_switch_to_other_sizes_recompiles_once():
    # Different kept counts change the shapes dynamo specialised on: one recompile (with
    # the neuron count made dynamic), then the result of the new expert.
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    a, b = expert_for(model, 0.35, seed=1), expert_for(model, 0.2, seed=2)
    want_b = model_logits(sliced_copy(model, b.indices), inputs)
    doe.unplug_(model, a, backend="torch")
    cnt = counter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    model_logits(compiled, inputs)
    doe.unplug_(model, b)
    torch.testing.assert_close(model_logits(compiled, inputs), want_b, atol=1e-4, rtol=1e-4)
    assert cnt.frame_count == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_graph_replays_and_switches_experts_by_index_copy(dtype):
    """Capture once; switch experts by copying same-length index lists into the captured
    buffers (a graph holds buffer addresses: rebinding them, as unplug_ does, is not seen)."""
    model = make_tiny("llama", dtype=dtype).cuda()
    inputs = sample_inputs(model, batch=2, seq=5)
    a, b = expert_for(model, 0.35, seed=1), expert_for(model, 0.35, seed=2)
    doe.unplug_(model, b, backend="triton")
    want_b = model_logits(model, inputs).clone()
    doe.unplug_(model, a, backend="triton")
    want_a = model_logits(model, inputs).clone()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # autotune and compile outside the capture
            model(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(**inputs).logits

    graph.replay()
    torch.testing.assert_close(out, want_a, atol=2e-2, rtol=2e-2)
    staged = b.stage(torch.device("cuda"))
    wrappers = gathered_wrappers(model)  # LLaMA: one fused wrapper per FFN block, in block order
    assert len(wrappers) == len(staged)
    for w, idx in zip(wrappers, staged):
        w.set_indices(idx, validated=True, in_place=True)
    graph.replay()
    torch.testing.assert_close(out, want_b, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(out, want_a, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_backward_gives_reference_input_and_weight_grads(backend):
    # Prompt tuning through a compiled model needs the input grad; weight grads when asked.
    import torch.nn.functional as F

    from doe_kernels import gathered_glu, gathered_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g)
    wg, wu, wd = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(24, 40, generator=g)
    idx = torch.randperm(40, generator=g)[:13].sort().values.to(torch.int32)
    li = idx.long()

    def ffn(x, wd):
        h = gathered_glu(x, wg, wu, rows=idx, backend=backend)
        return gathered_linear(h, wd, cols=idx, backend=backend).square().sum()

    def ref(x, wd):
        return F.linear(F.silu(x @ wg[li].t()) * (x @ wu[li].t()), wd[:, li]).square().sum()

    leaves = [t.clone().requires_grad_() for t in (x, wd)]
    got = torch.autograd.grad(torch.compile(ffn, backend=counter(), fullgraph=True)(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in (x, wd)]
    want = torch.autograd.grad(ref(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
