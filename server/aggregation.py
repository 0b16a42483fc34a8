"""Combining validated site updates into one: weighted mean, coordinate-wise trimmed mean or median.

Works on updates (local - global), tensor by tensor, so memory stays at (number of sites) x (largest
tensor). The robust options ignore example counts on purpose: a site cannot buy influence by claiming
more examples.

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

__all__ = ["METHODS", "aggregate_updates"]

METHODS: tuple[str, ...] = ("fedavg", "fedprox", "trimmed-mean", "median")


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
            for update, weight in zip(updates, weights):
                acc += update[name].float() * (float(weight) / total)
            out[name] = acc
        else:
            out[name] = _robust(torch.stack([u[name].float() for u in updates]), method, trim)
    return out
