"""MONAI's ROC-AUC and confusion-matrix metrics as an independent cross-check of lungmae_core.metrics.

MONAI is the medical-imaging toolkit the design builds on; its ``compute_roc_auc`` (per class, one-vs-rest) and
``get_confusion_matrix`` (per-class TP/FP/TN/FN) are a second implementation to hold ours against, on random
predictions with ties, on every class present, and on a split that lacks a class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc, get_confusion_matrix
from monai.utils import Average

from lungmae_core.metrics import classification_metrics

K = 4


def _case(seed: int, n: int = 60, absent: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = [c for c in range(K) if c != absent]
    y = rng.choice(classes, size=n)
    logits = rng.normal(size=(n, K)) + 1.5 * np.eye(K)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # ties, which both must count half
    return y, probs


@pytest.mark.filterwarnings("ignore:y values can not be all 0:UserWarning")  # MONAI on the absent class
@pytest.mark.parametrize("seed, absent", [(0, None), (1, None), (2, 3), (3, 0)])
def test_roc_auc_matches_monai_per_class_mean(seed: int, absent: int | None) -> None:
    y, probs = _case(seed, absent=absent)
    ours = classification_metrics(y, probs, K)
    present = [c for c in range(K) if (y == c).any() and (y != c).any()]
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), K).float()
    per_class = compute_roc_auc(torch.as_tensor(probs), onehot, average=Average.NONE)
    monai_macro = float(np.mean([per_class[c] for c in present]))
    if len(present) < K:  # a class missing from the split: the macro AUC is undefined, never a mean over fewer
        assert ours["roc_auc"] is None and ours["classes_present"] == len(present)
    else:
        assert ours["roc_auc"] == pytest.approx(monai_macro, abs=1e-6)  # MONAI sums in float32


@pytest.mark.parametrize("seed, absent", [(0, None), (2, 3)])
def test_confusion_matrix_matches_monai_tp_fp_tn_fn(seed: int, absent: int | None) -> None:
    y, probs = _case(seed, absent=absent)
    cm = np.asarray(classification_metrics(y, probs, K)["confusion_matrix"])
    pred = torch.nn.functional.one_hot(torch.as_tensor(probs.argmax(axis=1)), K).float()
    true = torch.nn.functional.one_hot(torch.as_tensor(y), K).float()
    # MONAI counts per sample and class; summed over samples: (K, 4) = TP, FP, TN, FN
    monai = get_confusion_matrix(pred, true, include_background=True).sum(dim=0).numpy()
    tp = np.diag(cm)
    np.testing.assert_array_equal(monai[:, 0], tp)
    np.testing.assert_array_equal(monai[:, 1], cm.sum(axis=0) - tp)
    np.testing.assert_array_equal(monai[:, 3], cm.sum(axis=1) - tp)
    np.testing.assert_array_equal(monai[:, 2], len(y) - cm.sum(axis=0) - cm.sum(axis=1) + tp)
