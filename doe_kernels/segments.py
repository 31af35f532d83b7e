"""Metadata of the segmented (mixed-batch) gathered ops: whose neurons each row uses.

A mixed batch multiplies each row (token) of x with the kept neurons of its own *group*:

    GroupedIndices   per layer, the kept-neuron lists of G groups in one int32 device buffer
                     (built once, when the groups are installed)
    TokenGroups      per batch, the group of every row and the permutation that groups them
                     (built on the host from host data, copied as one small tensor; no sync)

Both are plain tables a kernel reads with integer offsets (no pointer tables):

    GroupedIndices.table  (G + 1 + sum k_g,)  table[g]..table[g+1] is where group g's ids lie
    TokenGroups.table     (G + 1 + M,)        table[g]..table[g+1] is where group g's row ids lie

A group may be empty (no rows, or k_g = 0 kept neurons). A group whose list holds every
neuron (k_g == total) is a dense group: its rows run the full layer.

For decode-sized batches the ops can read the *union* of the active groups' neurons once and
ignore, per row, the neurons outside its own list (``GroupedIndices.union``); see
``choose_path``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from doe_kernels.validation import validate_indices

__all__ = [
    "BatchGroups", "GroupedIndices", "TokenGroups", "choose_path", "mixed_width", "PATHS", "UNION_CACHE", "UNION_MAX_M",
]

#: Unions (device ids and membership) a ``GroupedIndices`` keeps, least recently used first
#: out. A decode loop reuses one active set for every step, and a server sees far fewer distinct
#: sets than this at a time; a miss costs one host-side union and one small copy.
UNION_CACHE = 64

#: Ways to run a mixed batch: "single" (one active group: the plain gathered op on its list),
#: "segmented" (one launch, every tile reads its group's neurons), "union" (the union of the
#: active groups' neurons read once; each row ignores the others).
PATHS = ("auto", "single", "segmented", "union")

#: Mixed batches of at most this many rows may read the union of their groups' kept neurons
#: once instead of each group's own (``choose_path``): at decode sizes the weight bytes decide,
#: and overlapping groups share them. By byte count, not yet timed.
UNION_MAX_M = 16


def _as_table(starts: Sequence[int], body: torch.Tensor) -> torch.Tensor:
    """int32 (G + 1 + len(body),): the G + 1 offsets (shifted past themselves), then body."""
    head = torch.tensor(starts, dtype=torch.int64) + len(starts)
    return torch.cat([head, body.to(torch.int64)]).to(torch.int32)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _remember(cache: OrderedDict, key, value):
    """Put ``value`` in the LRU ``cache`` (at most ``UNION_CACHE`` entries) and return it."""
    cache[key] = value
    if len(cache) > UNION_CACHE:
        cache.popitem(last=False)
    return value


class GroupedIndices:
    """The kept-neuron lists of G groups for one layer, in one device buffer.

    Args:
        lists: G sorted unique id lists (1-D integer tensors or sequences; may be empty).
        total: the neurons on the gathered axis (ids lie in [0, total)).
        device: where the table lives.
        validated: the lists are int32 tensors already checked by ``validate_indices``.

    Attributes: ``table`` (see the module docstring), ``counts`` (host tuple of k_g),
    ``total``, ``num_groups``. Group g's ids on the device: ``group(g)`` (a view).
    """

    def __init__(self, lists: Sequence, total: int, device, *, validated: bool = False):
        if not isinstance(lists, (list, tuple)) or not lists:
            raise ValueError(f"lists: expected a non-empty list of index lists, got {type(lists).__name__}")
        host = []
        for g, idx in enumerate(lists):
            if validated:
                host.append(idx.detach().to("cpu", torch.int32))
            elif hasattr(idx, "__len__") and len(idx) == 0:
                host.append(torch.empty(0, dtype=torch.int32))
            else:
                host.append(validate_indices(idx, total, name=f"group {g} indices").cpu())
        self.total = int(total)
        self.counts = tuple(int(h.numel()) for h in host)
        self.num_groups = len(host)
        self._host = host
        starts = [0]
        for n in self.counts:
            starts.append(starts[-1] + n)
        self._starts = starts
        body = torch.cat(host) if sum(self.counts) else torch.empty(0, dtype=torch.int32)
        self.table = _to_device(_as_table(starts, body), torch.device(device))
        # active set -> (ids, member) on the device, and -> the union's size (host ints); both LRU
        self._unions: OrderedDict = OrderedDict()
        self._sizes: OrderedDict = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.table.device

    def group(self, g: int) -> torch.Tensor:
        """Group g's ids on the device: a (k_g,) int32 view of the table."""
        start = self.num_groups + 1 + self._starts[g]
        return self.table[start:start + self.counts[g]]

    def is_dense(self, g: int) -> bool:
        return self.counts[g] == self.total

    def width(self, active: Sequence[int]) -> int:
        """The padded width of a rows gather over groups ``active``: their largest k_g."""
        return max((self.counts[g] for g in active), default=0)

    def _union_host(self, key: tuple) -> torch.Tensor:
        """The sorted union of the lists of groups ``key``: (U,) int32 on the host."""
        if not key:
            return torch.empty(0, dtype=torch.int32)
        return torch.unique(torch.cat([self._host[g] for g in key])).to(torch.int32)

    def union_size(self, active: Sequence[int]) -> int:
        """U, the neurons kept by at least one of the groups ``active``; worked out on the host
        (nothing is built on the device) and cached like ``union``."""
        key = tuple(sorted(set(active)))
        hit = self._unions.get(key)
        if hit is not None:
            return hit[0].numel()
        size = self._sizes.get(key)
        if size is None:
            size = _remember(self._sizes, key, int(self._union_host(key).numel()))
        else:
            self._sizes.move_to_end(key)
        return size

    def union(self, active: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, member) for the groups ``active``: ids (U,) int32 the sorted union of their
        lists, member (G, U) bool, member[g, j] = ids[j] is kept by group g. Built on the
        host from host copies, copied to the device, and kept for the ``UNION_CACHE`` most
        recently used sets."""
        key = tuple(sorted(set(active)))
        hit = self._unions.get(key)
        if hit is not None:
            self._unions.move_to_end(key)
            return hit
        ids = self._union_host(key)
        member = torch.zeros(self.num_groups, ids.numel(), dtype=torch.bool)
        for g in key:
            member[g] = torch.isin(ids, self._host[g])
        return _remember(self._unions, key, (_to_device(ids, self.device), _to_device(member, self.device)))

    def __repr__(self) -> str:
        return f"GroupedIndices(groups={self.num_groups}, counts={list(self.counts)}, total={self.total})"


class TokenGroups:
    """The group of every row of x, and the permutation that lists each group's rows together.

    Built with ``TokenGroups.build``. Attributes: ``table`` (see the module docstring; rows are
    not moved, the kernels read and write them through it), ``counts`` (host tuple: rows per
    group), ``num_rows`` (M), ``num_groups``, ``active`` (host tuple of the groups with rows),
    ``max_rows`` (the largest group), ``row_groups`` ((M,) int32 device: the group of each row),
    ``plans`` (a dict for users to cache what they derive per ``GroupedIndices``, e.g. its path).
    """

    def __init__(self, table, counts, row_groups):
        self.table, self.counts, self.row_groups = table, tuple(counts), row_groups
        self.plans: dict = {}
        self.num_groups = len(self.counts)
        self.num_rows = sum(self.counts)
        self.active = tuple(g for g, n in enumerate(self.counts) if n)
        self.max_rows = max(self.counts, default=0)

    @classmethod
    def build(cls, groups: Sequence[int], num_groups: int, *, rows_per_item: int = 1,
              device=None) -> "TokenGroups":
        """Group the rows of a batch whose item i (``rows_per_item`` consecutive rows of x: the
        tokens of one sequence) belongs to group ``groups[i]``.

        Args:
            groups: one group id in [0, num_groups) per batch item (host ints).
            num_groups: G, the groups of the ``GroupedIndices`` it will be used with.
            rows_per_item: rows of x per item (tokens per sequence): M = len(groups) * rows_per_item.
            device: where the table goes.
        """
        g = torch.as_tensor(list(groups), dtype=torch.int64)
        if g.dim() != 1:
            raise ValueError(f"groups: expected one group id per batch item, got shape {tuple(g.shape)}")
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= num_groups):
            bad = int(g.min()) if int(g.min()) < 0 else int(g.max())
            raise ValueError(f"groups: group {bad} out of range, expected ids in [0, {num_groups})")
        if rows_per_item < 0:
            raise ValueError(f"rows_per_item: expected >= 0, got {rows_per_item}")
        per_row = g.repeat_interleave(rows_per_item)
        perm = torch.sort(per_row, stable=True).indices
        counts = torch.bincount(per_row, minlength=num_groups).tolist()
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        device = torch.device(device) if device is not None else torch.device("cpu")
        # one copy: the table, then the group of each row
        both = _to_device(torch.cat([_as_table(starts, perm), per_row.to(torch.int32)]), device)
        table = both[: num_groups + 1 + perm.numel()]
        return cls(table, counts, both[num_groups + 1 + perm.numel():])

    def __repr__(self) -> str:
        return f"TokenGroups(rows={self.num_rows}, counts={list(self.counts)})"


_BATCH_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "attention_mask")


class BatchGroups:
    """The group of each batch item for the forwards that run while it is set; shared by the
    wrappers of one model, so that every FFN block of a forward sees one assignment.

    ``set(items)`` assigns (a host list of group ids, one per batch item, i.e. per sequence)
    or clears (None). ``rows_for(x)`` gives the ``TokenGroups`` of an FFN input x (..., K) of
    M = x.numel() // K rows, item-major: each item's rows (its tokens, padding included)
    follow it, M // len(items) of them. x is (B, ..., K) with B = len(items), or its rows
    flattened to (M, K) (OPT's FFN), M a multiple of len(items). The tables are built once
    per input shape and cached until the next ``set``: every layer, and every decode step of
    one shape, reuses one small table.

    ``input_items``: the batch size where the batch entered the model, if the caller knows it
    (None otherwise; ``set`` clears it). A flattened x hides its item count, so without it a
    batch of another size whose rows divide evenly would pass.

    Args:
        num_groups: G, the groups of the ``GroupedIndices`` the wrappers hold.
        hint: appended to the error of a forward with no assignment: how the caller's users
            assign one (e.g. the API that calls ``set``).
    """

    def __init__(self, num_groups: int, *, hint: Optional[str] = None):
        self.num_groups = num_groups
        self.hint = hint
        self.items: Optional[tuple] = None
        self.input_items: Optional[int] = None
        self._rows: dict = {}

    def set(self, items: Optional[Sequence[int]]) -> None:
        if items is not None:
            items = tuple(int(g) for g in items)
            bad = [g for g in items if not 0 <= g < self.num_groups]
            if bad:
                raise ValueError(f"items: group {bad[0]} out of range, expected ids in [0, {self.num_groups})")
        self.items, self._rows, self.input_items = items, {}, None

    def size_hook(self):
        """A forward pre-hook (``register_forward_pre_hook(..., with_kwargs=True)``) for the module
        a batch enters by: it notes the batch size of its input in ``input_items``."""

        def note(module, args, kwargs):
            tensors = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
            tensors += [kwargs[name] for name in _BATCH_INPUTS if isinstance(kwargs.get(name), torch.Tensor)]
            self.input_items = next((t.shape[0] for t in tensors if t.dim() >= 2), None)
            return None

        return note

    def rows_for(self, x: torch.Tensor) -> TokenGroups:
        items = self.items
        if items is None:
            hint = f"; {self.hint}" if self.hint else ""
            raise RuntimeError(f"these gathered modules hold {self.num_groups} groups (several index lists): assign "
                               f"a group to each row first (BatchGroups.set){hint}")
        per_item = self._rows_per_item(x, len(items))
        if self.input_items is not None and self.input_items != len(items):
            raise ValueError(f"the batch has {self.input_items} items where it entered the model, but {len(items)} "
                             "were assigned a group (one per item)")
        key = (x.shape[:-1], x.device)
        rows = self._rows.get(key)
        if rows is None:
            rows = TokenGroups.build(items, self.num_groups, rows_per_item=per_item, device=x.device)
            self._rows[key] = rows
        return rows

    @staticmethod
    def _rows_per_item(x: torch.Tensor, n: int) -> int:
        """Rows of x per batch item, or a ValueError if x's shape does not fit ``n`` items."""
        if x.dim() >= 3:  # (B, ..., K): B is the batch; a mismatch must not pass as other row counts
            if x.shape[0] != n:
                raise ValueError(f"the batch has {x.shape[0]} rows (input {tuple(x.shape)}), but {n} were "
                                 "assigned a group")
            return math.prod(x.shape[1:-1])
        m = math.prod(x.shape[:-1])  # (M, K) or (K,): rows flattened item-major
        if m % n:
            raise ValueError(f"the batch has {m} rows (input {tuple(x.shape)}), not a multiple of the {n} items "
                             "that were assigned a group")
        return m // n


def choose_path(grouped: GroupedIndices, groups: TokenGroups, path: str = "auto") -> str:
    """How to run a mixed batch (one of ``PATHS`` but "auto"): "single" when one group has
    rows; else "union" for decode-sized batches (M <= UNION_MAX_M) whose active groups'
    union is smaller than their lists together (fewer weight bytes read); else "segmented".
    The up and down projections of a block get the same answer for the same arguments."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    if len(groups.active) <= 1:
        return "single"
    if groups.num_rows <= UNION_MAX_M:
        if grouped.union_size(groups.active) < sum(grouped.counts[g] for g in groups.active):
            return "union"
    return "segmented"


def mixed_width(grouped: GroupedIndices, groups: TokenGroups, path: str) -> int:
    """The width of h (the rows gather's output, the cols gather's input) on a resolved ``path``:
    the union's size ("union"), else the largest kept count among the groups with rows."""
    if path == "union":
        return grouped.union_size(groups.active)
    return grouped.width(groups.active)


def __getattr__(name: str):
    if name == "RowGroups":
        warnings.warn("doe_kernels RowGroups is now TokenGroups; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return TokenGroups
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
