"""Classification metrics of the ILD task and the key sets every training/evaluation call returns.

Everything returned is a plain float, int or nested list, so it can go into JSON and into Flower's
``MetricRecord`` (after dropping the confusion matrix) without conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CLASSIFICATION_KEYS", "MAE_EVAL_KEYS", "MAE_TRAIN_KEYS", "CLASSIFIER_TRAIN_KEYS",
           "classification_metrics"]

#: Keys of :func:`classification_metrics` (``confusion_matrix`` is a list of lists, the rest scalars).
CLASSIFICATION_KEYS = ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc", "roc_auc_classes",
                       "confusion_matrix")
#: Keys of ``train.evaluate_mae``.
MAE_EVAL_KEYS = ("l1_masked", "l1_masked_lung", "baseline_l1_masked", "baseline_l1_masked_lung",
                 "num_examples")
#: Keys of ``train.train_mae``.
MAE_TRAIN_KEYS = ("loss", "loss_lung", "loss_non_lung", "num_examples", "num_steps", "lr_last", "seconds")
#: Keys of ``train.train_classifier``.
CLASSIFIER_TRAIN_KEYS = ("loss", "accuracy", "num_examples", "num_steps", "lr_last", "seconds")


def _roc_auc_binary(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) form, ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    start = 0
    for end in range(1, len(scores) + 1):
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: Sequence[Sequence[float]] | np.ndarray, num_classes: int
) -> dict[str, float | int | list[list[int]]]:
    """Accuracy, balanced accuracy, weighted F1, macro one-vs-rest ROC AUC and the confusion matrix.

    Small validation and test splits at one hospital often lack a class, so classes absent from ``y_true``
    are handled instead of crashing: balanced accuracy averages the recall of the classes present;
    weighted F1 weights by support (absent classes weigh 0); ROC AUC is the mean one-vs-rest AUC over the
    classes that have both positives and negatives in ``y_true`` (``roc_auc_classes`` says how many). When no
    class qualifies (a single class present), ``roc_auc`` is 0.5, the chance level, with
    ``roc_auc_classes`` = 0, so the value is never NaN.

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
    pred = p.argmax(axis=1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(num_classes), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(num_classes), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(num_classes), where=denom > 0)
    aucs = [_roc_auc_binary(y == c, p[:, c]) for c in range(num_classes) if 0 < support[c] < len(y)]
    return {
        "accuracy": float(tp.sum() / len(y)),
        "balanced_accuracy": float(recall[present].mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "roc_auc": float(np.mean(aucs)) if aucs else 0.5,
        "roc_auc_classes": len(aucs),
        "confusion_matrix": cm.tolist(),
    }
