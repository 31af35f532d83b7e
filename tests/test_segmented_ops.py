"""segmented_linear / segmented_glu: mixed batches against each row run alone on its own list.

Every result is compared with F.linear on explicitly sliced weights, row by row (the hand
reference), and the Triton kernels (interpreted on CPU) with the torch reference. Groups
include an empty one, a one-row one, one keeping 0 neurons and a dense one (every neuron).
"""

import pytest
import torch
import torch.nn.functional as F

from doe_kernels import dtype_name
from doe_kernels.ops.api import segmented_glu, segmented_linear
from doe_kernels.reference import ACTIVATIONS
from doe_kernels.segments import UNION_CACHE, BatchGroups, GroupedIndices, TokenGroups, choose_path, mixed_width
from doe_kernels.testing import random_indices
from kernel_utils import DEVICE, TOLERANCES, triton_runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K, N = 40, 70  # hidden, neurons: neither a multiple of the block sizes

# group -> kept list: 25 random, 9 random, one kept, none kept, all kept (dense)
LISTS = [random_indices(N, 25, seed=1), random_indices(N, 9, seed=2), torch.tensor([33]),
         torch.empty(0, dtype=torch.long), torch.arange(N)]
# per batch item: group 2 has one item, group 3 (0 kept) one, group 4 (dense) two; no item is
# in every group at once below, and ``ONE_GROUP`` is all one group
MIXED = [0, 1, 4, 0, 3, 1, 0, 2, 4]
ONE_GROUP = [1, 1, 1]
EMPTY_GROUP = [0, 4, 0]  # groups 1, 2, 3 empty

ROWS_PER_ITEM = 3

needs_triton = pytest.mark.skipif(not triton_runs(), reason="needs a GPU or TRITON_INTERPRET=1")


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def setup(items, lists=LISTS):
    grouped = GroupedIndices(lists, N, DEVICE)
    groups = TokenGroups.build(items, len(lists), rows_per_item=ROWS_PER_ITEM, device=DEVICE)
    return grouped, groups


def row_lists(items, lists=LISTS):
    """The kept list of every row of x (items' tokens in order)."""
    return [torch.as_tensor(lists[g], dtype=torch.long) for g in items for _ in range(ROWS_PER_ITEM)]


def alone_rows(x, w, b, items):
    """Per row: F.linear on the sliced weight, in fp32."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    return [F.linear(x2[m], w.float()[idx], None if b is None else b.float()[idx])
            for m, idx in enumerate(row_lists(items))]


def assert_rows_form(out, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    out2 = out.reshape(-1, out.shape[-1]).float()
    for m, e in enumerate(expected):
        torch.testing.assert_close(out2[m, : e.numel()], e, atol=atol * scale, rtol=rtol)
        assert not out2[m, e.numel():].any(), f"row {m}: padding beyond its {e.numel()} kept neurons is not zero"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("items", [MIXED, ONE_GROUP, EMPTY_GROUP], ids=["mixed", "one-group", "empty-groups"])
def test_rows_then_cols_match_each_row_alone(items, dtype):
    grouped, groups = setup(items)
    x = rand(len(items), ROWS_PER_ITEM, K, dtype=dtype, seed=1)
    w_up, b_up = rand(N, K, dtype=dtype, seed=2), rand(N, dtype=dtype, seed=3)
    w_down = rand(K, N, dtype=dtype, seed=4).t().contiguous().t()  # neuron-major, as unplug stores it
    b_down = rand(K, dtype=dtype, seed=5)
    path = "single" if len(set(items)) == 1 else "segmented"
    h = segmented_linear(x, w_up, b_up, rows=grouped, groups=groups, path=path, backend="triton")
    assert h.shape == (len(items), ROWS_PER_ITEM, grouped.width(groups.active))
    assert_rows_form(h, alone_rows(x, w_up, b_up, items), dtype)
    ref = segmented_linear(x, w_up, b_up, rows=grouped, groups=groups, path=path, backend="torch")
    torch.testing.assert_close(h.float(), ref.float(), atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])

    y = segmented_linear(h, w_down, b_down, cols=grouped, groups=groups, path=path, backend="triton")
    h2 = h.reshape(-1, h.shape[-1]).float()
    expected = torch.stack([F.linear(h2[m, : idx.numel()], w_down.float()[:, idx], b_down.float())
                            for m, idx in enumerate(row_lists(items))])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.reshape(-1, K).float(), expected, atol=atol * 4, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu_matches_each_row_alone(activation, dtype):
    grouped, groups = setup(MIXED)
    x = rand(len(MIXED), ROWS_PER_ITEM, K, dtype=dtype, seed=1)
    wg, wu = rand(N, K, dtype=dtype, seed=2), rand(N, K, dtype=dtype, seed=3)
    bg = rand(N, dtype=dtype, seed=4)
    out = segmented_glu(x, wg, wu, rows=grouped, groups=groups, activation=activation, gate_bias=bg,
                        path="segmented", backend="triton")
    g = alone_rows(x, wg, bg, MIXED)
    u = alone_rows(x, wu, None, MIXED)
    expected = [ACTIVATIONS[activation](gi) * ui for gi, ui in zip(g, u)]
    umax = max(float(ui.abs().max()) for ui in u if ui.numel())
    assert_rows_form(out, expected, dtype, scale=1 + umax)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_path_gives_the_same_result(backend):
    # a decode-sized batch: "auto" picks the union, which must agree with the segmented form
    items = [0, 1, 0, 2]
    grouped = GroupedIndices(LISTS, N, DEVICE)
    groups = TokenGroups.build(items, len(LISTS), device=DEVICE)
    assert choose_path(grouped, groups) == "union"
    x = rand(len(items), K, seed=1)
    w_up, b_up, w_down, b_down = rand(N, K, seed=2), rand(N, seed=3), rand(K, N, seed=4), rand(K, seed=5)
    wg = rand(N, K, seed=6)
    outs = {}
    for path in ("segmented", "union"):
        h = segmented_linear(x, w_up, b_up, rows=grouped, groups=groups, path=path, backend=backend)
        assert h.shape[-1] == mixed_width(grouped, groups, path)
        glu = segmented_glu(x, wg, w_up, rows=grouped, groups=groups, path=path, backend=backend)
        outs[path] = (segmented_linear(h, w_down, b_down, cols=grouped, groups=groups, path=path, backend=backend),
                      segmented_linear(glu, w_down, None, cols=grouped, groups=groups, path=path, backend=backend))
    expected_ffn, expected_glu = [], []
    for m, idx in enumerate(row_lists(items)[::ROWS_PER_ITEM]):
        h = F.linear(x[m], w_up[idx], b_up[idx])
        expected_ffn.append(F.linear(h, w_down[:, idx], b_down))
        expected_glu.append(F.linear(F.silu(F.linear(x[m], wg[idx])) * F.linear(x[m], w_up[idx]), w_down[:, idx]))
    for path, (ffn, glu) in outs.items():
        torch.testing.assert_close(ffn, torch.stack(expected_ffn), atol=1e-4, rtol=1e-4, msg=lambda m: f"{path}: {m}")
        torch.testing.assert_close(glu, torch.stack(expected_glu), atol=1e-4, rtol=1e-4, msg=lambda m: f"{path}: {m}")


@needs_triton
def test_single_group_paths_are_the_plain_ops():
    # one group with rows: the single path; a dense group runs the full layer
    x, w, b = rand(2, ROWS_PER_ITEM, K, seed=1), rand(N, K, seed=2), rand(N, seed=3)
    for items, idx in (([1, 1], LISTS[1]), ([4, 4], LISTS[4])):
        grouped, groups = setup(items)
        assert choose_path(grouped, groups) == "single"
        out = segmented_linear(x, w, b, rows=grouped, groups=groups, backend="triton")
        torch.testing.assert_close(out, F.linear(x, w[idx], b[idx]), atol=2e-4, rtol=2e-4)


def _grads(fn, *tensors, dy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves, dy)


@needs_triton
@pytest.mark.parametrize("form", ["rows", "cols", "glu"])
def test_backward_matches_reference(form):
    grouped, groups = setup(MIXED)
    width = grouped.width(groups.active)
    w, b, w2 = rand(N, K, seed=2), rand(N, seed=3), rand(N, K, seed=6)
    if form == "cols":
        w, b = rand(K, N, seed=2), rand(K, seed=3)
        x = segmented_linear(rand(len(MIXED), ROWS_PER_ITEM, K, seed=1), w.t().contiguous(), None, rows=grouped,
                             groups=groups, path="segmented", backend="torch")  # zero padding, as the rows form writes
        dy = rand(len(MIXED), ROWS_PER_ITEM, K, seed=4)
    else:
        x = rand(len(MIXED), ROWS_PER_ITEM, K, seed=1)
        dy = rand(len(MIXED), ROWS_PER_ITEM, width, seed=4)

    def op(backend):
        if form == "glu":
            return lambda x, w, b: segmented_glu(x, w, w2, rows=grouped, groups=groups, gate_bias=b,
                                                 path="segmented", backend=backend)
        key = "rows" if form == "rows" else "cols"
        return lambda x, w, b: segmented_linear(x, w, b, **{key: grouped}, groups=groups, path="segmented",
                                                backend=backend)

    got = _grads(op("triton"), x, w, b, dy=dy)
    want = _grads(op("torch"), x, w, b, dy=dy)
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(g, r, atol=5e-4, rtol=5e-4, msg=lambda m: f"grad {name}: {m}")


@needs_triton
def test_custom_ops_pass_opcheck():
    from doe_kernels.ops.segmented_glu_kernel import segmented_glu_op
    from doe_kernels.ops.segmented_linear_kernel import segmented_linear_op

    grouped, groups = setup([0, 4])
    width, active = grouped.width(groups.active), len(groups.active)
    x = rand(2, ROWS_PER_ITEM, K, seed=1).requires_grad_()
    w, b = rand(N, K, seed=2), rand(N, seed=3)
    meta = (grouped.table, groups.table)
    torch.library.opcheck(segmented_linear_op, (x, w, b, *meta, True, width, active, groups.max_rows))
    torch.library.opcheck(segmented_glu_op, (x, w, w, None, b, *meta, "silu", width, active, groups.max_rows))


def test_metadata_is_checked_before_any_work():
    grouped, groups = setup(MIXED)
    x, w = rand(len(MIXED), ROWS_PER_ITEM, K, seed=1), rand(N, K, seed=2)
    with pytest.raises(ValueError, match="one group per row of x"):
        segmented_linear(x[:2], w, rows=grouped, groups=groups)
    with pytest.raises(ValueError, match="groups index 70 neurons"):
        segmented_linear(x, rand(N + 1, K, seed=2), rows=grouped, groups=groups)
    with pytest.raises(ValueError, match="over 3 groups, the index lists over 5"):
        segmented_linear(x, w, rows=grouped, groups=TokenGroups.build([0, 1, 2], 3, device=DEVICE))
    with pytest.raises(ValueError, match="expected last dimension"):
        segmented_linear(x, rand(K, N, seed=3), cols=grouped, groups=groups, path="segmented")
    with pytest.raises(ValueError, match="exactly one of rows= or cols="):
        segmented_linear(x, w, groups=groups)
    with pytest.raises(ValueError, match=r"group 5 out of range, expected ids in \[0, 5\)"):
        TokenGroups.build([0, 5], 5)
    with pytest.raises(ValueError, match="duplicated index"):
        GroupedIndices([[1, 1]], N, DEVICE)
    with pytest.raises(ValueError, match="path: expected one of"):
        segmented_linear(x, w, rows=grouped, groups=groups, path="fast")


def test_union_holds_each_groups_membership():
    grouped = GroupedIndices(LISTS[:3], N, DEVICE)
    ids, member = grouped.union((0, 2))
    want = torch.unique(torch.cat([LISTS[0], LISTS[2]]))
    assert torch.equal(ids.cpu().long(), want)
    for g in (0, 2):
        assert torch.equal(ids.cpu().long()[member[g].cpu()], LISTS[g].sort().values)
    assert not member[1].any()  # not asked for
    assert grouped.union((2, 0))[0] is ids  # cached per set


def test_unions_are_built_for_the_union_path_only_and_stay_bounded():
    # 17 groups over 200 neurons, overlapping: most 8-row batches read the union, each batch a new
    # set of groups; far more sets than the cache holds, every result still each row's own
    lists = [random_indices(200, 70, seed=10 + g) for g in range(17)]
    grouped = GroupedIndices(lists, 200, DEVICE)
    w, b = rand(200, K, seed=2), rand(200, seed=3)
    gen = torch.Generator().manual_seed(0)
    sets, paths = set(), []
    for i in range(4 * UNION_CACHE):
        items = torch.randint(0, 17, (8,), generator=gen).tolist()
        groups = TokenGroups.build(items, 17, device=DEVICE)
        sets.add(groups.active)
        paths.append(choose_path(grouped, groups))
        x = rand(8, K, seed=100 + i)
        h = segmented_linear(x, w, b, rows=grouped, groups=groups, backend="torch")
        for m, g in enumerate(items):
            idx = torch.as_tensor(lists[g], dtype=torch.long)
            want = F.linear(x[m], w[idx], b[idx])
            got = h[m][grouped.union(groups.active)[1][g]] if paths[-1] == "union" else h[m, : idx.numel()]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert len(grouped._unions) <= UNION_CACHE  # device tensors
    assert len(grouped._sizes) <= UNION_CACHE  # host ints
    assert len(sets) > 2 * UNION_CACHE and "union" in paths
    # an evicted set is built again, the same
    first = sorted(sets)[0]
    ids, member = grouped.union(first)
    assert torch.equal(ids.cpu().long(), torch.unique(torch.cat([torch.as_tensor(lists[g]) for g in first])))


def test_choosing_segmented_builds_no_union():
    # disjoint lists: the union is as large as the lists together, so "auto" takes the segmented path
    lists = [torch.arange(0, 20), torch.arange(20, 50), torch.arange(50, N)]
    grouped = GroupedIndices(lists, N, DEVICE)
    groups = TokenGroups.build([0, 1, 2, 1], 3, device=DEVICE)
    assert choose_path(grouped, groups) == "segmented"
    assert mixed_width(grouped, groups, "segmented") == 30 and mixed_width(grouped, groups, "union") == N
    assert not grouped._unions  # sizes come from the host; nothing was put on the device


@pytest.mark.parametrize("flat", [False, True], ids=["batch-major", "flattened"])
def test_batch_groups_split_rows_item_major(flat):
    # (B, T, K) or its rows flattened to (B*T, K), as OPT's FFN sees them: item i owns rows i*T..(i+1)*T-1
    batch = BatchGroups(len(LISTS))
    batch.set(MIXED)
    x = rand(len(MIXED), ROWS_PER_ITEM, K, seed=1)
    groups = batch.rows_for(x.reshape(-1, K) if flat else x)
    assert groups.num_rows == len(MIXED) * ROWS_PER_ITEM
    assert groups.row_groups.cpu().tolist() == [g for g in MIXED for _ in range(ROWS_PER_ITEM)]
    grouped = GroupedIndices(LISTS, N, DEVICE)
    w = rand(N, K, seed=2)
    h = segmented_linear(x.reshape(-1, K) if flat else x, w, rows=grouped, groups=groups, path="segmented",
                         backend="torch")
    assert_rows_form(h, alone_rows(x, w, None, MIXED), torch.float32)


def test_batch_groups_refuse_inputs_that_do_not_fit_the_items():
    batch = BatchGroups(len(LISTS))
    with pytest.raises(RuntimeError, match=r"assign a group to each row first \(BatchGroups.set\)$") as err:
        batch.rows_for(rand(2, K))
    assert "doe" not in str(err.value)  # the kernel layer names no framework API
    hinted = BatchGroups(len(LISTS), hint="call set_rows() first")
    with pytest.raises(RuntimeError, match=r"\(BatchGroups.set\); call set_rows\(\) first$"):
        hinted.rows_for(rand(2, K))
    batch.set([0, 1])
    with pytest.raises(ValueError, match=r"the batch has 7 rows \(input \(7, 40\)\), not a multiple of the 2 items"):
        batch.rows_for(rand(7, K))
    with pytest.raises(ValueError, match=r"the batch has 4 rows \(input \(4, 3, 40\)\), but 2 were assigned"):
        batch.rows_for(rand(4, 3, K))  # 12 rows would split in two, but the batch dimension says 4 items
    assert batch.rows_for(rand(2, K)).num_rows == 2 and batch.rows_for(rand(6, K)).counts[:2] == (3, 3)
