"""Bootstrap intervals over test patients: per arm, and paired between two arms (the primary endpoint).

Every arm is scored on the same test patients with the same seeds, so a comparison resamples patients once
and scores both arms on each resample (paired); with several seeds the statistic is the mean over seeds of
each seed's score on the resample. 95% intervals are the 2.5 and 97.5 percentiles of ``n_boot`` resamples.
"""

from __future__ import annotations

import numpy as np

from lungmae_core.metrics import classification_metrics

__all__ = ["balanced_accuracy", "summarise", "paired_difference"]


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y``."""
    recalls = [float((pred[y == c] == c).mean()) for c in range(num_classes) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else 0.0


def _scores(y: np.ndarray, probs: list[np.ndarray], idx: np.ndarray, num_classes: int, auc: bool
            ) -> tuple[float, float]:
    """Seed-mean balanced accuracy and (optionally) ROC AUC on the resample ``idx``."""
    yb = y[idx]
    ba = float(np.mean([balanced_accuracy(yb, p[idx].argmax(1), num_classes) for p in probs]))
    if not auc:
        return ba, float("nan")
    # ROC AUC is undefined (None) on a resample that misses a class (small subsets): it counts as NaN there,
    # and the intervals are percentiles over the resamples where it is defined.
    aucs = [classification_metrics(yb, p[idx], num_classes)["roc_auc"] for p in probs]
    defined = [float(a) for a in aucs if isinstance(a, (int, float))]
    return ba, float(np.mean(defined)) if defined else float("nan")


def summarise(y: np.ndarray, probs: list[np.ndarray], num_classes: int, *, n_boot: int = 1000, seed: int = 0,
              subset: np.ndarray | None = None) -> dict[str, object]:
    """Balanced accuracy and ROC AUC (means over seeds) with 95% bootstrap intervals over test patients.

    Args:
        y: (N,) test labels. probs: one (N, K) probability array per seed. num_classes: K.
        n_boot: resamples. seed: seeds the resampling. subset: restrict to these test patients (e.g. the
            held-out scanner's).
    """
    y = np.asarray(y)
    base = np.arange(len(y)) if subset is None else np.flatnonzero(subset)
    ba, auc = _scores(y, probs, base, num_classes, auc=True)
    rng = np.random.default_rng(seed)
    boots = np.array([_scores(y, probs, rng.choice(base, size=len(base)), num_classes, auc=True)
                      for _ in range(n_boot)])
    per_seed = [balanced_accuracy(y[base], p[base].argmax(1), num_classes) for p in probs]
    return {"balanced_accuracy": ba, "balanced_accuracy_ci": np.nanpercentile(boots[:, 0], [2.5, 97.5]).tolist(),
            "roc_auc": auc, "roc_auc_ci": np.nanpercentile(boots[:, 1], [2.5, 97.5]).tolist(),
            "balanced_accuracy_per_seed": per_seed, "seeds": len(probs), "test_patients": int(len(base))}


def paired_difference(y: np.ndarray, probs_a: list[np.ndarray], probs_b: list[np.ndarray], num_classes: int, *,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, object]:
    """Balanced accuracy of A minus B (seed means), with a paired 95% bootstrap interval over test patients."""
    y = np.asarray(y)
    idx = np.arange(len(y))
    diff = _scores(y, probs_a, idx, num_classes, False)[0] - _scores(y, probs_b, idx, num_classes, False)[0]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        r = rng.choice(idx, size=len(idx))
        boots.append(_scores(y, probs_a, r, num_classes, False)[0] - _scores(y, probs_b, r, num_classes, False)[0])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"difference": float(diff), "ci": [float(lo), float(hi)],
            "p_not_above_zero": float(np.mean(np.asarray(boots) <= 0)),
            "seeds": len(probs_a), "test_patients": int(len(y))}
