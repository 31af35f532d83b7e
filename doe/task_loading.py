"""Reading a task's splits from its files or the Hub (``doe.tasks.load_task`` calls ``read_task``)."""

from __future__ import annotations

import math
import os
import random
import re
from typing import Any, Optional, Sequence

import numpy as np

from doe.tasks import LOCAL_BUILDERS, LOCAL_HINT, OFFLINE_TASKS, Example, TaskData, TaskSpec

__all__ = ["read_task", "subsample"]


def read_task(spec: TaskSpec, *, max_train: Optional[int], max_eval: Optional[int], seed: int) -> TaskData:
    """The train and eval examples of ``spec`` (see ``doe.tasks.load_task``)."""
    raw = _load_raw(spec)
    if spec.holdout:
        train_ds, eval_ds = _held_out(spec, _get_split(spec, raw, spec.train_split))
        eval_name = f"{spec.holdout:.0%} held out of {spec.train_split}"
    else:
        train_ds, eval_ds, eval_name = (_get_split(spec, raw, spec.train_split), _get_split(spec, raw, spec.eval_split),
                                        spec.eval_split)
    train = _examples(spec, train_ds, spec.train_split, max_train, seed)
    eval_ = _examples(spec, eval_ds, eval_name, max_eval, seed + 1)
    return TaskData(spec=spec, train=train, eval=eval_)


def _is_hub(spec: TaskSpec) -> bool:
    return spec.dataset not in LOCAL_BUILDERS and not os.path.exists(spec.dataset)


def _describe(spec: TaskSpec) -> str:
    args = repr(spec.dataset) + (f", {spec.config!r}" if spec.config else "")
    return f"load_dataset({args})"


def _check_local_files(spec: TaskSpec) -> None:
    files = spec.data_files
    paths = [files] if isinstance(files, str) else [p for v in files.values() for p in ([v] if isinstance(v, str) else v)]
    for p in paths:
        if "://" in p or any(c in p for c in "*?[") or os.path.exists(p):
            continue
        raise FileNotFoundError(f"task {spec.name!r}: data file {p!r} does not exist")


def _load_raw(spec: TaskSpec):
    import datasets  # lazy: importing datasets takes a second, and most of doe never needs it

    args: list[Any] = [spec.dataset] + ([spec.config] if spec.config is not None else [])
    kwargs: dict[str, Any] = {}
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    if not _is_hub(spec):
        if spec.data_files is not None:
            _check_local_files(spec)
        try:
            return datasets.load_dataset(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"task {spec.name!r}: could not read {spec.dataset} data {spec.data_files!r}: "
                             f"{type(e).__name__}: {e}") from e
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:
        offline = isinstance(e, (ConnectionError, TimeoutError)) or "offline" in type(e).__name__.lower()
        cls = ConnectionError if offline else RuntimeError
        why = ("the Hugging Face Hub is unreachable (no network, or offline mode without a cached copy)"
               if offline else "the call failed")
        raise cls(f"task {spec.name!r}: {_describe(spec)} failed: {why}: {type(e).__name__}: {e}\n{LOCAL_HINT}\n"
                  f"The offline suite ({', '.join(OFFLINE_TASKS)}) needs no network.") from e


_SLICE = re.compile(r"^(?P<split>[^\[\]]+)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def _bound(v: Optional[str], n: int) -> Optional[int]:
    if v is None:
        return None
    if v.endswith("%"):
        return int(round(int(v[:-1]) * n / 100))
    return int(v)


def _get_split(spec: TaskSpec, raw: Any, split: str):
    """raw: a DatasetDict (or a plain Dataset, taken as the only split). Slices like
    "train[:80%]" select rows in order, as datasets does."""
    import datasets

    if isinstance(raw, datasets.Dataset):
        raw = {"train": raw}
    m = _SLICE.match(split)
    name = m.group("split") if m and split not in raw else split
    if name not in raw:
        raise ValueError(f"task {spec.name!r}: split {name!r} not found; the data has splits {sorted(raw)}. "
                         f"Set train_split / eval_split, pass data_files={{'train': ..., 'validation': ...}}, "
                         f"or hold out part of one split with train_split='train[:80%]', "
                         f"eval_split='train[80%:]'.")
    ds = raw[name]
    if name != split:
        n = len(ds)
        ds = ds.select(range(n)[slice(_bound(m.group("start"), n), _bound(m.group("stop"), n))])
    return ds


def _label_ids(spec: TaskSpec, values: Sequence[Any], split: str) -> list[int]:
    if spec.is_generation:  # one class: samples and hold-outs are plain seeded draws
        return [0] * len(values)
    lookup = {name: i for i, name in enumerate(spec.labels)}
    folded: dict[str, int] = {}
    for i, name in enumerate(spec.labels):
        folded.setdefault(name.strip().casefold(), i)
    n = len(spec.labels)
    out: list[int] = []
    unknown: dict[Any, int] = {}
    for row, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if isinstance(v, float) and not math.isnan(v) and v.is_integer():
            v = int(v)
        if isinstance(v, (int, np.integer)):
            v = int(v)
            if v == -1:
                raise ValueError(f"task {spec.name!r}, split {split!r}, row {row}: label -1 means unlabeled "
                                 f"(GLUE test splits have no labels); evaluate on a labeled split")
            if not 0 <= v < n:
                raise ValueError(f"task {spec.name!r}, split {split!r}, row {row}: label id {v} is out of range "
                                 f"for {n} labels {spec.labels}")
            out.append(v)
        elif isinstance(v, str):
            if v in lookup:
                out.append(lookup[v])
            elif v.strip().casefold() in folded:
                out.append(folded[v.strip().casefold()])
            elif v.strip().lstrip("-").isdigit() and 0 <= int(v) < n:
                out.append(int(v))
            else:
                unknown.setdefault(v, row)
                out.append(-1)
        elif v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"task {spec.name!r}, split {split!r}, row {row}: missing label in field "
                             f"{spec.label_field!r}")
        else:
            raise ValueError(f"task {spec.name!r}, split {split!r}, row {row}: cannot read label {v!r} "
                             f"({type(v).__name__}); expected an id in 0..{n - 1} or one of {spec.labels}")
    if unknown:
        shown = ", ".join(f"{k!r} (row {r})" for k, r in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"task {spec.name!r}, split {split!r}: unknown label value(s) {shown}{more}; "
                         f"the task's labels are {spec.labels} (or their ids 0..{n - 1})")
    return out


def subsample(labels: Sequence[int], k: Optional[int], seed: int) -> list[int]:
    """Row indices of a seeded, stratified sample of size k (all rows, in order, when k is None
    or >= len). Each label gets its proportional share (largest remainder), at least one row
    where k allows; the chosen rows come back in their original order."""
    n = len(labels)
    if k is None or k >= n:
        return list(range(n))
    if k < 0:
        raise ValueError(f"max_train / max_eval must be >= 0, got {k}")
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    classes = sorted(by_label)
    exact = {c: len(by_label[c]) * k / n for c in classes}
    quota = {c: int(math.floor(exact[c])) for c in classes}
    left = k - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:left]:
        quota[c] += 1
    if k >= len(classes):  # every label present at least once
        for c in classes:
            if quota[c] == 0:
                donor = max(classes, key=lambda d: (quota[d], -d))
                quota[donor] -= 1
                quota[c] = 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in classes:
        chosen += rng.sample(by_label[c], quota[c])
    return sorted(chosen)


def _check_fields(spec: TaskSpec, ds: Any, split: str) -> None:
    columns = list(ds.column_names)
    missing = [f for f in (*spec.text_fields, spec.label_field) if f not in columns]
    if missing:
        raise ValueError(f"task {spec.name!r}, split {split!r}: field(s) {missing} not in the data; the fields "
                         f"present are {columns}. Set text_fields=(...) and label_field=... to match "
                         f"(e.g. local_task(..., text_fields=({columns[0]!r},), label_field=...)).")


def _examples(spec: TaskSpec, ds: Any, split: str, k: Optional[int], seed: int) -> list[Example]:
    _check_fields(spec, ds, split)
    labels = _label_ids(spec, ds[spec.label_field], split)
    keep = subsample(labels, k, seed)
    if len(keep) < len(labels):
        ds = ds.select(keep)
        labels = [labels[i] for i in keep]
    texts = [ds[f] for f in spec.text_fields]
    out = []
    for row, y in enumerate(labels):
        fields = []
        for f, col in zip(spec.text_fields, texts):
            t = col[row]
            if t is None:
                raise ValueError(f"task {spec.name!r}, split {split!r}, row {keep[row]}: field {f!r} is empty")
            fields.append(t if isinstance(t, str) else str(t))
        out.append(Example(text=fields[0], label=y, text_pair=fields[1] if len(fields) == 2 else None))
    if spec.is_generation:
        for row, (example, completion) in enumerate(zip(out, ds[spec.completion_field])):
            if not isinstance(completion, str) or not completion.strip():
                raise ValueError(f"task {spec.name!r}, split {split!r}, row {keep[row]}: completion field "
                                 f"{spec.completion_field!r}: expected a non-empty text, got {completion!r}")
            example.completion = completion
    return out


_HOLDOUT_SEED = 1234  # fixed: every load of a task holds out the same rows, whatever ``seed`` is


def _held_out(spec: TaskSpec, ds: Any) -> tuple[Any, Any]:
    """(train rows, held-out rows) of ``ds``: ``spec.holdout`` of it, stratified by label."""
    _check_fields(spec, ds, spec.train_split)
    labels = _label_ids(spec, ds[spec.label_field], spec.train_split)
    n_eval = round(spec.holdout * len(labels))
    if not 0 < n_eval < len(labels):
        raise ValueError(f"task {spec.name!r}: holding out {spec.holdout:.0%} of {len(labels)} training rows leaves "
                         f"{n_eval} to evaluate and {len(labels) - n_eval} to train; expected at least one of each "
                         "(give a separate eval file, or more data)")
    held = set(subsample(labels, n_eval, _HOLDOUT_SEED))
    for y in set(labels):  # a label with too few rows keeps one to train on
        rows = [i for i, v in enumerate(labels) if v == y]
        if all(i in held for i in rows):
            held.discard(rows[0])
    if not held:
        raise ValueError(f"task {spec.name!r}: every label of the {len(labels)} training rows has too few rows to "
                         "hold any out; give a separate eval file, or more data")
    return ds.select([i for i in range(len(labels)) if i not in held]), ds.select(sorted(held))
