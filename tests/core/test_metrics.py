"""Classification metrics against scikit-learn, and the cases small hospital splits produce."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from lungmae_core.metrics import (
    CLASSIFICATION_KEYS,
    auc_from_histograms,
    auc_histogram_error_bound,
    classification_metrics,
    pooled_from_confusion,
    score_histogram,
)


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


def test_absent_class_makes_macro_metrics_undefined_not_perfect() -> None:
    y = np.array([0, 0, 1, 1, 3, 3])  # class 2 absent
    probs = np.eye(4)[[0, 1, 1, 1, 3, 2]] * 0.7 + 0.075
    out = classification_metrics(y, probs, 4)
    assert out["classes_present"] == 3
    assert out["balanced_accuracy"] is None and out["roc_auc"] is None
    assert out["confusion_matrix"][3] == [0, 0, 1, 1]
    assert all(np.isfinite(out[k]) for k in ("accuracy", "weighted_f1"))


def test_one_class_split_is_not_reported_perfect() -> None:
    """Three hospitals with only 'normal' test scans: a perfect-looking 1.0 must not come out."""
    out = classification_metrics([0, 0, 0], np.tile([0.9, 0.05, 0.03, 0.02], (3, 1)), 4)
    assert out["accuracy"] == 1.0 and out["classes_present"] == 1
    assert out["balanced_accuracy"] is None and out["roc_auc"] is None


def test_single_class_gives_undefined_auc() -> None:
    out = classification_metrics([2, 2, 2], np.full((3, 4), 0.25), 4)
    assert (out["roc_auc"], out["classes_present"], out["accuracy"]) == (None, 1, 0.0)


def test_pooled_confusion_matches_direct_metrics() -> None:
    rng = np.random.default_rng(4)
    y = np.concatenate([np.arange(4), rng.integers(0, 4, 46)])
    probs = rng.dirichlet(np.ones(4), size=50)
    direct = classification_metrics(y, probs, 4)
    pooled = pooled_from_confusion(np.asarray(direct["confusion_matrix"]))
    for key in ("accuracy", "balanced_accuracy", "weighted_f1", "classes_present"):
        assert pooled[key] == pytest.approx(direct[key])
    assert pooled_from_confusion(np.zeros((3, 3)))["accuracy"] is None


@pytest.mark.parametrize("seed, n", [(0, 60), (1, 300), (2, 2000)])
def test_histogram_auc_of_pooled_sites_is_within_its_bound_of_the_exact_auc(seed: int, n: int) -> None:
    """Three sites send histograms; the server's pooled AUC vs the exact AUC of all scans together."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(4), rng.integers(0, 4, n - 4)])
    probs = rng.dirichlet(np.ones(4), size=n)
    probs[np.arange(n), y] += rng.uniform(0, 0.6, n)
    probs /= probs.sum(axis=1, keepdims=True)
    parts = np.array_split(np.arange(n), 3)
    pooled = np.sum([score_histogram(y[i], probs[i], 4) for i in parts], axis=0)
    approx, classes = auc_from_histograms(pooled, 4)
    exact = skm.roc_auc_score(y, probs, multi_class="ovr")
    bound = auc_histogram_error_bound(pooled, 4)
    assert classes == 4 and abs(approx - exact) <= bound + 1e-12
    # documented figure (docs/CONTRACTS.md): with 100 bins the error stays below 0.005 here
    assert abs(approx - exact) < 0.005 and bound < 0.02


def test_histogram_auc_undefined_without_every_class() -> None:
    hist = score_histogram(np.array([0, 0, 1]), np.tile([0.5, 0.3, 0.2], (3, 1)), 3)
    assert auc_from_histograms(hist, 3) == (None, 2)


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
