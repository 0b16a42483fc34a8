"""Classification metrics of the ILD task, their pooled (server-side) forms, and the key sets of training calls.

One snake_case vocabulary: the keys returned here are the keys on the wire (``lungmae_core.contract``), in
``metrics.json`` and in the report. A metric over classes that a split does not contain is ``None``
(undefined), never a perfect or chance score: ``balanced_accuracy`` and the macro ``roc_auc`` need every
class of the federation's class list in the split (``classes_present`` says how many are).

Pooling without per-scan data: the server sums the sites' confusion matrices (exact pooled accuracy,
balanced accuracy, weighted F1) and their per-class score histograms (:func:`score_histogram`, fixed bins
over [0, 1]); :func:`auc_from_histograms` is the one-vs-rest macro ROC AUC of all scans together, exact
up to pairs whose scores fall in the same bin (counted half; :func:`auc_histogram_error_bound`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["CLASSIFICATION_KEYS", "MAE_EVAL_KEYS", "MAE_TRAIN_KEYS", "CLASSIFIER_TRAIN_KEYS", "HIST_BINS",
           "classification_metrics", "pooled_from_confusion", "score_histogram", "auc_from_histograms",
           "auc_histogram_error_bound"]

#: Keys of :func:`classification_metrics` (``confusion_matrix`` is a list of lists, ``score_histogram`` a flat
#: list; ``balanced_accuracy``/``roc_auc`` may be None).
CLASSIFICATION_KEYS = ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc", "classes_present",
                       "confusion_matrix", "score_histogram")
#: Keys of ``train.evaluate_mae``.
MAE_EVAL_KEYS = ("l1_masked", "l1_masked_lung", "baseline_l1_masked", "baseline_l1_masked_lung",
                 "num_examples")
#: Keys of ``train.train_mae``.
MAE_TRAIN_KEYS = ("loss", "loss_lung", "loss_non_lung", "num_examples", "num_steps", "lr_last", "seconds")
#: Keys of ``train.train_classifier``.
CLASSIFIER_TRAIN_KEYS = ("loss", "accuracy", "num_examples", "num_steps", "lr_last", "seconds")
#: Bins of :func:`score_histogram` (the contract's ``HIST_BINS``).
HIST_BINS = 100


def _roc_auc_binary(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) form, ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    for end in range(1, len(scores) + 1):  # average ranks over ties
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def score_histogram(y: np.ndarray, probs: np.ndarray, num_classes: int, bins: int = HIST_BINS) -> list[int]:
    """Per class c: ``bins`` counts of ``p_c`` over the scans of class c, then over the other scans.

    Flat list of ``2 * num_classes * bins`` counts; bin i covers [i/bins, (i+1)/bins) (1.0 in the last).
    """
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    out = np.zeros((num_classes, 2, bins), dtype=np.int64)
    for c in range(num_classes):
        pos = y == c
        out[c, 0] = np.bincount(idx[pos, c], minlength=bins)
        out[c, 1] = np.bincount(idx[~pos, c], minlength=bins)
    return [int(v) for v in out.reshape(-1)]


def _hist(hist: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    h = np.asarray(hist, dtype=np.float64)
    if h.size % (2 * num_classes) != 0 or h.size == 0:
        raise ValueError(f"a score histogram of {num_classes} classes has 2 x {num_classes} x bins counts; "
                         f"got {h.size}")
    return h.reshape(num_classes, 2, -1)


def auc_from_histograms(hist: Sequence[int] | np.ndarray, num_classes: int) -> tuple[float | None, int]:
    """Macro one-vs-rest ROC AUC of pooled score histograms; ``(None, k)`` unless every class has both
    positives and negatives (k: how many do).

    For each class, AUC = P(score_pos > score_neg) + P(equal) / 2 with scores known to their bin: a positive
    beats every negative in a lower bin, and pairs in the same bin count half.
    """
    h = _hist(hist, num_classes)
    aucs = []
    for c in range(num_classes):
        pos, neg = h[c, 0], h[c, 1]
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            continue
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in strictly lower bins
        aucs.append(float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg)))
    return (float(np.mean(aucs)) if len(aucs) == num_classes else None), len(aucs)


def auc_histogram_error_bound(hist: Sequence[int] | np.ndarray, num_classes: int) -> float:
    """Upper bound of |histogram AUC - exact AUC|: half the mean fraction of (pos, neg) pairs sharing a bin."""
    h = _hist(hist, num_classes)
    bounds = [0.5 * float((h[c, 0] * h[c, 1]).sum() / (h[c, 0].sum() * h[c, 1].sum()))
              for c in range(num_classes) if h[c, 0].sum() > 0 and h[c, 1].sum() > 0]
    return float(np.mean(bounds)) if bounds else 0.0


def pooled_from_confusion(cm: np.ndarray) -> dict[str, float | int | None]:
    """Accuracy, balanced accuracy, weighted F1 and ``classes_present`` of a (C, C) confusion matrix (rows:
    truth). Summing the sites' matrices gives exactly the metrics of all their scans together.

    ``balanced_accuracy`` is None unless every class has support; everything is None for an empty matrix.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    support = cm.sum(axis=1)
    present = int((support > 0).sum())
    if total <= 0:
        return {"accuracy": None, "balanced_accuracy": None, "weighted_f1": None, "classes_present": 0}
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / total),
        "balanced_accuracy": float(recall.mean()) if present == len(cm) else None,
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "classes_present": present,
    }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: Sequence[Sequence[float]] | np.ndarray, num_classes: int
) -> dict[str, float | int | None | list[Any]]:
    """Accuracy, balanced accuracy, weighted F1, macro one-vs-rest ROC AUC, confusion matrix, score histogram.

    Small validation and test splits at one hospital often lack a class. Then ``balanced_accuracy`` and
    ``roc_auc`` (metrics over all classes) are ``None``, and ``classes_present`` says how many of the
    ``num_classes`` classes the split holds; accuracy and the support-weighted F1 stay defined.

    Args:
        y_true: (N,) integer labels in [0, num_classes).
        probs: (N, num_classes) class probabilities (softmax outputs).
        num_classes: K.

    Returns:
        dict with ``CLASSIFICATION_KEYS``; ``confusion_matrix[i][j]`` counts true class i predicted as j.

    Raises:
        ValueError: for mismatched lengths, a bad probability shape, labels out of range or no samples.
    """
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"probs must have shape (N, {num_classes}); got {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} labels but probs has {len(p)} rows")
    if len(y) == 0:
        raise ValueError("Unable to compute classification metrics as there are no samples")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got values from {y.min()} to {y.max()}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, p.argmax(axis=1)), 1)
    pooled = pooled_from_confusion(cm)
    support = cm.sum(axis=1)
    aucs = [_roc_auc_binary(y == c, p[:, c]) for c in range(num_classes) if 0 < support[c] < len(y)]
    return {
        "accuracy": pooled["accuracy"],
        "balanced_accuracy": pooled["balanced_accuracy"],
        "weighted_f1": pooled["weighted_f1"],
        "roc_auc": float(np.mean(aucs)) if len(aucs) == num_classes else None,
        "classes_present": pooled["classes_present"],
        "confusion_matrix": cm.tolist(),
        "score_histogram": score_histogram(y, p, num_classes),
    }
