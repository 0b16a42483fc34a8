"""Bootstrap intervals over test patients: per arm, and paired between two arms (the primary endpoint).

Every arm is scored on the same test patients with the same seeds, so a comparison resamples patients once
and scores both arms on each resample (paired); with several seeds the statistic is the mean over seeds of
each seed's score on the resample. 95% intervals are the 2.5 and 97.5 percentiles of ``n_boot`` resamples.

All resamples are scored at once: resample b is a row of patient multiplicities, and balanced accuracy and
ROC AUC are weighted sums over patients (a matrix product, and one sort per class for the AUC), the same
figures a loop over resampled arrays gives (tested against that loop) in a small fraction of its time: the
experiment rewrites its summaries after every step, so this loop was minutes of a `--quick` run.
"""

from __future__ import annotations

import numpy as np

__all__ = ["balanced_accuracy", "summarise", "paired_difference"]


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y`` (0 when ``y`` is empty)."""
    y = np.asarray(y)
    return float(_balanced_accuracy_w(y, np.asarray(pred), np.ones((1, len(y))), num_classes)[0])


def _resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n)`` multiplicities: row b counts how often each of the ``n`` patients is in resample b.

    The draws are those of ``n_boot`` successive ``rng.choice(n, size=n)`` calls (one resample at a time).
    """
    picks = rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), np.int64)
    offsets = (np.arange(n_boot)[:, None] * n + picks).ravel()
    return np.bincount(offsets, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _balanced_accuracy_w(y: np.ndarray, pred: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced accuracy (mean recall over the classes present) of each weighting row of ``counts``."""
    onehot = (y[:, None] == np.arange(num_classes)[None, :]).astype(np.float64)  # (n, K)
    support = counts @ onehot  # (B, K)
    hits = counts @ (onehot * (pred == y)[:, None])
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=present)
    n_present = present.sum(axis=1)
    return np.where(n_present > 0, recall.sum(axis=1) / np.maximum(n_present, 1), 0.0)


def _roc_auc_w(positive: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of each weighting row (ties count half); NaN where a side has no weight.

    With integer weights this is the Mann-Whitney form on the resample with its repeated patients, i.e. what
    the rank-sum AUC of :mod:`lungmae_core.metrics` gives on ``y[idx]``, computed for all rows at once.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    w = counts[:, order]
    pos = positive[order]
    p_w = np.add.reduceat(w * pos, starts, axis=1)  # (B, groups of equal score)
    n_w = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(n_w, axis=1) - n_w
    num = (p_w * (below + 0.5 * n_w)).sum(axis=1)
    den = p_w.sum(axis=1) * n_w.sum(axis=1)
    auc: np.ndarray = np.divide(num, den, out=np.full(len(counts), np.nan), where=den > 0)
    return auc


def _scores_w(y: np.ndarray, probs: list[np.ndarray], counts: np.ndarray, num_classes: int, auc: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """Seed-mean balanced accuracy and (optionally) macro ROC AUC of each weighting row of ``counts``.

    The macro AUC of a seed is undefined (NaN) on a resample that misses a class, as in
    :func:`lungmae_core.metrics.classification_metrics`; the seed mean is over the seeds where it is defined.
    """
    ba = np.mean([_balanced_accuracy_w(y, p.argmax(1), counts, num_classes) for p in probs], axis=0)
    if not auc:
        return ba, np.full(len(counts), np.nan)
    per_seed = np.array([np.mean([_roc_auc_w(y == c, p[:, c].astype(np.float64), counts)
                                  for c in range(num_classes)], axis=0) for p in probs])  # (seeds, B)
    defined = np.isfinite(per_seed)
    total = np.where(defined, per_seed, 0.0).sum(axis=0)
    n_def = defined.sum(axis=0)
    return ba, np.divide(total, n_def, out=np.full(len(counts), np.nan), where=n_def > 0)


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
    yb, pb = y[base], [np.asarray(p)[base] for p in probs]
    ba, auc = (float(v[0]) for v in _scores_w(yb, pb, np.ones((1, len(base))), num_classes, auc=True))
    boots = np.stack(_scores_w(yb, pb, _resample_counts(np.random.default_rng(seed), len(base), n_boot),
                               num_classes, auc=True), axis=1)
    per_seed = [balanced_accuracy(yb, p.argmax(1), num_classes) for p in pb]
    return {"balanced_accuracy": ba, "balanced_accuracy_ci": _percentiles(boots[:, 0]),
            "roc_auc": auc, "roc_auc_ci": _percentiles(boots[:, 1]),
            "balanced_accuracy_per_seed": per_seed, "seeds": len(probs), "test_patients": int(len(base))}


def _percentiles(values: np.ndarray) -> list[float]:
    """The 2.5 and 97.5 percentiles of the defined values (NaN, NaN when none is)."""
    finite = values[np.isfinite(values)]
    return np.percentile(finite, [2.5, 97.5]).tolist() if len(finite) else [float("nan"), float("nan")]


def paired_difference(y: np.ndarray, probs_a: list[np.ndarray], probs_b: list[np.ndarray], num_classes: int, *,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, object]:
    """Balanced accuracy of A minus B (seed means), with a paired 95% bootstrap interval over test patients."""
    y = np.asarray(y)
    one = np.ones((1, len(y)))
    diff = float(_scores_w(y, probs_a, one, num_classes, False)[0][0] - _scores_w(y, probs_b, one, num_classes,
                                                                                  False)[0][0])
    counts = _resample_counts(np.random.default_rng(seed), len(y), n_boot)
    boots = _scores_w(y, probs_a, counts, num_classes, False)[0] - _scores_w(y, probs_b, counts, num_classes, False)[0]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"difference": diff, "ci": [float(lo), float(hi)],
            "p_not_above_zero": float(np.mean(boots <= 0)),
            "seeds": len(probs_a), "test_patients": int(len(y))}
