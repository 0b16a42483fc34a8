"""Classification metrics against scikit-learn, and the cases small hospital splits produce."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from lungmae_core.metrics import CLASSIFICATION_KEYS, classification_metrics


@pytest.mark.parametrize("seed, n, k", [(0, 40, 4), (1, 25, 2), (2, 60, 3), (3, 9, 4)])
def test_agrees_with_sklearn(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    probs = rng.dirichlet(np.ones(k), size=n)
    probs[np.arange(n), y] += rng.uniform(0, 0.5, n)  # informative but imperfect
    probs /= probs.sum(axis=1, keepdims=True)
    out = classification_metrics(y, probs, k)
    pred = probs.argmax(axis=1)
    assert tuple(out) == CLASSIFICATION_KEYS
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    expected_auc = skm.roc_auc_score(y, probs, multi_class="ovr") if k > 2 else skm.roc_auc_score(y, probs[:, 1])
    assert out["roc_auc"] == pytest.approx(expected_auc)
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=list(range(k))).tolist()


def test_absent_class_is_left_out_without_nan() -> None:
    y = np.array([0, 0, 1, 1, 3, 3])  # class 2 absent
    probs = np.eye(4)[[0, 1, 1, 1, 3, 2]] * 0.7 + 0.075
    out = classification_metrics(y, probs, 4)
    assert out["roc_auc_classes"] == 3
    assert out["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert out["confusion_matrix"][3] == [0, 0, 1, 1]
    assert all(np.isfinite(out[k]) for k in ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc"))


def test_single_class_gives_chance_auc() -> None:
    out = classification_metrics([2, 2, 2], np.full((3, 4), 0.25), 4)
    assert (out["roc_auc"], out["roc_auc_classes"], out["accuracy"]) == (0.5, 0, 0.0)


def test_ties_count_half() -> None:
    assert classification_metrics([0, 1, 0, 1], np.full((4, 2), 0.5), 2)["roc_auc"] == 0.5


@pytest.mark.parametrize("y, probs, k, message", [
    ([0, 1], np.ones((3, 2)) / 2, 2, "y_true has 2 labels but probs has 3 rows"),
    ([0, 1], np.ones((2, 3)) / 3, 2, "probs must have shape (N, 2); got (2, 3)"),
    ([0, 4], np.ones((2, 2)) / 2, 2, "labels must be in [0, 2); got values from 0 to 4"),
    ([], np.ones((0, 2)), 2, "there are no samples"),
])
def test_bad_input(y, probs, k: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        classification_metrics(y, probs, k)
    assert message in str(info.value)
