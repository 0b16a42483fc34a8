"""Combining validated site updates into one: weighted mean, coordinate-wise trimmed mean or median.

Works on updates (local - global), tensor by tensor, so memory stays at (number of sites) x (largest
tensor). The robust options ignore example counts on purpose: a site cannot buy influence by claiming
more examples. The weighted mean takes its weights through :func:`capped_shares`, so no site's share
exceeds ``max-site-share`` whatever count it reports.

Examples:
    >>> import torch
    >>> ups = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([100.0])}]
    >>> aggregate_updates(ups, [1, 1, 1], "median")["w"]
    tensor([2.])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["METHODS", "aggregate_updates", "capped_shares"]

METHODS: tuple[str, ...] = ("fedavg", "fedprox", "trimmed-mean", "median")


def capped_shares(weights: Sequence[float], cap: float) -> list[float]:
    """Normalised weights with no share above ``cap`` (the excess goes to the others, in proportion).

    With ``n`` sites the cap cannot be below ``1 / n``: then every site gets ``1 / n``.

    Raises:
        ValueError: no weights, a negative or non-finite weight, or a cap outside (0, 1].

    Examples:
        >>> [round(s, 3) for s in capped_shares([1e15, 5, 5], 0.5)]
        [0.5, 0.25, 0.25]
    """
    if not weights:
        raise ValueError("Unable to share weights as there are none")
    if not 0 < cap <= 1:
        raise ValueError(f"max-site-share must be in (0, 1]; got {cap}")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError("weights must be finite and >= 0")
    n = len(w)
    if cap * n <= 1 or sum(w) <= 0:
        return [1.0 / n] * n
    fixed = [False] * n
    shares = [x / sum(w) for x in w]
    while True:
        over = [i for i in range(n) if not fixed[i] and shares[i] > cap * (1 + 1e-12)]
        if not over:
            return shares
        for i in over:
            fixed[i] = True
        free = 1.0 - cap * sum(fixed)
        rest = sum(w[i] for i in range(n) if not fixed[i])
        n_rest = n - sum(fixed)
        for i in range(n):
            shares[i] = cap if fixed[i] else (free * w[i] / rest if rest > 0 else free / n_rest)


def _robust(stacked: torch.Tensor, method: str, trim: float) -> torch.Tensor:
    """stacked: (K, ...) one row per site -> (...)."""
    k = stacked.shape[0]
    ordered, _ = torch.sort(stacked, dim=0)
    if method == "median":
        lo, hi = (k - 1) // 2, k // 2
        return (ordered[lo] + ordered[hi]) / 2
    cut = int(math.floor(trim * k))
    if k - 2 * cut < 1:
        cut = (k - 1) // 2
    return ordered[cut:k - cut].mean(dim=0)


def aggregate_updates(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    method: str = "fedavg",
    trim: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Aggregate updates of identical layout.

    Args:
        updates: one ``name -> tensor`` per site (already validated: same names and shapes).
        weights: aggregation weight per site (its ``num-examples``); used by fedavg/fedprox only.
        method: one of :data:`METHODS`.
        trim: fraction cut at each end by ``trimmed-mean`` (at least one value is always kept).

    Returns:
        name -> aggregated tensor (float32 for floating entries; integer buffers: the first site's).

    Raises:
        ValueError: no updates, a length mismatch, an unknown method or all weights zero for fedavg.
    """
    if not updates:
        raise ValueError("Unable to aggregate as there are no updates")
    if len(weights) != len(updates):
        raise ValueError(f"Unable to aggregate as there are {len(updates)} updates but {len(weights)} weights")
    if method not in METHODS:
        raise ValueError(f"aggregation method must be one of {', '.join(METHODS)}; got {method!r}")
    total = float(sum(weights))
    if method in ("fedavg", "fedprox") and not total > 0:
        raise ValueError("Unable to average as the sites' num-examples sum to 0")
    out: dict[str, torch.Tensor] = {}
    for name, first in updates[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        if method in ("fedavg", "fedprox"):
            acc = torch.zeros_like(first, dtype=torch.float32)
            for update, weight in zip(updates, weights, strict=True):
                acc += update[name].float() * (float(weight) / total)
            out[name] = acc
        else:
            out[name] = _robust(torch.stack([u[name].float() for u in updates]), method, trim)
    return out
