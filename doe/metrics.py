"""Task metrics: classification scores from label ids, and the overlap scores of generated text.

    compute_metric("macro_f1", predictions, labels)
    exact_match("Paris.", "paris")  -> 1.0      rouge_l("the cat sat", "the cat")  -> 0.8
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

__all__ = ["METRICS", "GENERATION_METRICS", "compute_metric", "exact_match", "rouge_l"]

METRICS = ("accuracy", "matthews_corrcoef", "f1", "macro_f1")
#: what a generation task reports: per-token NLL of the held-out completions (and perplexity),
#: exact match and ROUGE-L F1 of greedy generations
GENERATION_METRICS = ("nll", "exact_match", "rouge_l")

def _as_int_array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        a = a.reshape(-1)
    if a.size and not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"compute_metric: {what} must be integer label ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def compute_metric(metric: str, predictions: Sequence[int], labels: Sequence[int]) -> float:
    """accuracy; matthews_corrcoef (multi-class form, 0.0 when undefined, as sklearn);
    f1 (binary, positive = 1; 0.0 when there is no positive in either, as sklearn);
    macro_f1 (mean F1 over the labels present in predictions or labels)."""
    if metric not in METRICS:
        raise ValueError(f"compute_metric: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    p = _as_int_array(predictions, "predictions")
    y = _as_int_array(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"compute_metric: {len(p)} predictions for {len(y)} labels")
    if p.size == 0:
        raise ValueError("compute_metric: no examples")
    if metric == "accuracy":
        return float(np.mean(p == y))
    if metric == "f1":
        bad = sorted(set(np.unique(np.concatenate([p, y])).tolist()) - {0, 1})
        if bad:
            raise ValueError(f"compute_metric: 'f1' is binary (ids 0 and 1), got ids {bad}; use 'macro_f1'")
        tp = int(np.sum((p == 1) & (y == 1)))
        fp = int(np.sum((p == 1) & (y == 0)))
        fn = int(np.sum((p == 0) & (y == 1)))
        return float(_f1(tp, fp, fn))
    classes = np.unique(np.concatenate([p, y]))
    if metric == "macro_f1":
        scores = [_f1(int(np.sum((p == c) & (y == c))), int(np.sum((p == c) & (y != c))),
                      int(np.sum((p != c) & (y == c)))) for c in classes]
        return float(np.mean(scores))
    # Matthews correlation, multi-class (Gorodkin 2004), as sklearn computes it
    idx = {c: i for i, c in enumerate(classes.tolist())}
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, ([idx[v] for v in y.tolist()], [idx[v] for v in p.tolist()]), 1)
    t_sum, p_sum = cm.sum(axis=1), cm.sum(axis=0)
    n_correct, n = np.trace(cm), cm.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def _words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped (the SQuAD-style normalisation without articles)."""
    return re.findall(r"\w+", text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts have the same words (case and punctuation ignored), else 0.0."""
    return float(_words(prediction) == _words(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): the longest common word subsequence's precision and recall, on
    lower-cased words; 1.0 for two empty texts."""
    a, b = _words(prediction), _words(reference)
    if not a or not b:
        return float(a == b)
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)
