"""The cross-site evaluation matrix: every model scored on every site's test split, as ``metrics.json`` holds it.

After fine-tuning, each consenting site fine-tunes a local copy from the global encoder; every site then scores
the global model and each shared local model on its own test split. The result shows which site's data
generalises (a row that stays high across columns) and which site is the outlier (a column that is low for every
model). This module is the plain-data half of that feature: it turns the scores into the ``final.cross_site``
structure of ``metrics.json`` (suppressing counts below each data site's minimum) and reads it back for the
report. It knows nothing of Flower; the runner gathers the scores.

``final.cross_site`` (format 1)::

    {
      "format": 1,
      "models": ["global", "site0", "site2"],     # rows: "global" = the final global classifier,
                                                  #   a site name = that site's locally fine-tuned copy
      "data_sites": ["site0", "site1", "site2"],  # columns: whose test split scored the model
      "metrics": {                                # one models x data_sites matrix per metric
        "balanced_accuracy": [[0.71, 0.55, null], ...],
        "roc_auc": [[0.80, 0.62, null], ...]      # null: not evaluated, or undefined (one class)
      },
      "num_examples": [[24, null, 12], ...],      # test scans behind each cell; null when not evaluated
                                                  #   or suppressed
      "suppressed": [[false, true, false], ...],  # true: fewer scans than the data site's minimum, so the
                                                  #   count is withheld (the metrics are pooled figures
                                                  #   and stay)
      "min_count": {"site0": 10, "site1": 10, "site2": 10},
      "notes": {                                  # why a row, a column or a cell is empty (written by the runner)
        "not_shared": {"site1": "..."},           #   sites whose policy shares no local model (no row)
        "models": {"site2": "..."},               #   a row left null: no local model, or dropped by a check
        "cells": [{"model": .., "data_site": .., "reason": ..}],  # an evaluation refused, failed or dropped
        "skipped": "..."                          #   present when the whole step could not run
      }
    }

The runner adds ``local_training`` (each local model's training metrics as the site sent them), ``bytes``
(down/up of the step) and ``duration_s``; readers ignore keys they do not know.

The old form, ``{site: {metric: value}}`` (the global model scored at each site), is still recognised by the
report, which labels it "global model per site".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CROSS_SITE_FORMAT", "CROSS_SITE_METRICS", "DEFAULT_MIN_COUNT", "GLOBAL_MODEL", "CrossSiteMatrix",
           "build_cross_site", "is_cross_site_matrix", "read_cross_site"]

CROSS_SITE_FORMAT = 1
CROSS_SITE_METRICS: tuple[str, ...] = ("balanced_accuracy", "roc_auc")
GLOBAL_MODEL = "global"
# A site that states no minimum gets the same default as the site policy's per-class count suppression.
DEFAULT_MIN_COUNT = 10


@dataclasses.dataclass(frozen=True)
class CrossSiteMatrix:
    """``final.cross_site`` read back: ``metrics[name][i][j]`` is model ``models[i]`` on ``data_sites[j]``."""

    models: tuple[str, ...]
    data_sites: tuple[str, ...]
    metrics: dict[str, list[list[float | None]]]
    num_examples: list[list[int | None]]
    suppressed: list[list[bool]]
    min_count: dict[str, int]
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def cell(self, metric: str, model: str, data_site: str) -> float | None:
        """One value by names (None when absent)."""
        rows = self.metrics.get(metric)
        if rows is None or model not in self.models or data_site not in self.data_sites:
            return None
        return rows[self.models.index(model)][self.data_sites.index(data_site)]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def build_cross_site(scores: Mapping[tuple[str, str], Mapping[str, Any]], *, models: Sequence[str],
                     data_sites: Sequence[str], min_count: Mapping[str, int] | None = None,
                     metrics: Sequence[str] = CROSS_SITE_METRICS) -> dict[str, Any]:
    """The ``final.cross_site`` structure from the scores the sites sent.

    Args:
        scores: ``{(model, data_site): {"balanced_accuracy": .., "roc_auc": .., "num_examples": ..}}``; a
            pair that was not evaluated is simply absent. ``roc_auc`` may be None (one class in the split).
            A score with ``"suppressed": true`` (the site said its split is below its minimum) is withheld too.
        models: row order; ``"global"`` first by convention, then the sites that shared a local model.
        data_sites: column order: the sites that scored models on their test split.
        min_count: each data site's minimum count; a cell with fewer scans has its count withheld.
            Sites not listed get :data:`DEFAULT_MIN_COUNT`.
        metrics: the metric matrices to keep.

    Returns:
        A JSON-ready mapping (format 1, see the module docstring).

    Raises:
        ValueError: repeated or empty model / site names, or a score for a pair outside ``models`` x
            ``data_sites`` (a bug in the caller: the scores would silently vanish otherwise).
    """
    models, data_sites = [str(m) for m in models], [str(s) for s in data_sites]
    for what, names in (("model", models), ("data site", data_sites)):
        if len(set(names)) != len(names) or any(not n for n in names):
            raise ValueError(f"cross-site {what} names must be unique and non-empty; got {names}")
    unknown = [pair for pair in scores if pair[0] not in models or pair[1] not in data_sites]
    if unknown:
        raise ValueError(f"cross-site scores for pairs outside the matrix: {sorted(unknown)[:5]}")
    minimum = {site: int((min_count or {}).get(site, DEFAULT_MIN_COUNT)) for site in data_sites}
    out_metrics: dict[str, list[list[float | None]]] = {m: [] for m in metrics}
    counts: list[list[int | None]] = []
    suppressed: list[list[bool]] = []
    for model in models:
        count_row: list[int | None] = []
        hidden_row: list[bool] = []
        for site in data_sites:
            score = scores.get((model, site))
            n = _finite(score.get("num_examples")) if score is not None else None
            # the site's own word counts too: it flags a split below its policy's minimum
            hidden = n is not None and (n < minimum[site] or bool((score or {}).get("suppressed")))
            count_row.append(None if n is None or hidden else int(n))
            hidden_row.append(hidden)
        for metric in metrics:
            out_metrics[metric].append([_finite((scores.get((model, site)) or {}).get(metric))
                                        for site in data_sites])
        counts.append(count_row)
        suppressed.append(hidden_row)
    return {"format": CROSS_SITE_FORMAT, "models": models, "data_sites": data_sites, "metrics": out_metrics,
            "num_examples": counts, "suppressed": suppressed, "min_count": minimum}


def is_cross_site_matrix(raw: Any) -> bool:
    """Whether ``final.cross_site`` is the matrix form (not the old ``{site: metrics}`` mapping)."""
    return isinstance(raw, Mapping) and "models" in raw and "data_sites" in raw


def _grid(raw: Any, rows: int, cols: int, convert: Any) -> list[list[Any]] | None:
    if not isinstance(raw, list) or len(raw) != rows:
        return None
    if any(not isinstance(r, list) or len(r) != cols for r in raw):
        return None
    return [[convert(v) for v in r] for r in raw]


def read_cross_site(raw: Any) -> tuple[CrossSiteMatrix | None, str]:
    """Read ``final.cross_site`` in matrix form; ``(None, why)`` when it is absent or malformed.

    The report must render whatever the run left, so a malformed matrix becomes a sentence on the page
    rather than an exception.
    """
    if not is_cross_site_matrix(raw):
        return None, "metrics.json has no cross-site matrix (final.cross_site with models and data_sites)."
    models, sites = raw.get("models"), raw.get("data_sites")
    if not (isinstance(models, list) and isinstance(sites, list) and models and sites
            and all(isinstance(x, str) for x in models + sites)):
        return None, "final.cross_site names no models or data sites (lists of names expected)."
    metrics: dict[str, list[list[float | None]]] = {}
    raw_metrics = raw.get("metrics")
    if isinstance(raw_metrics, Mapping):
        for name, grid in raw_metrics.items():
            values = _grid(grid, len(models), len(sites), _finite)
            if values is None:
                return None, (f"final.cross_site.metrics.{name} is not a {len(models)} x {len(sites)} matrix "
                              "(models x data sites).")
            metrics[str(name).replace("-", "_")] = values
    if not metrics:
        return None, "final.cross_site holds no metric matrix."

    def count(v: Any) -> int | None:
        n = _finite(v)
        return None if n is None else int(n)

    counts = _grid(raw.get("num_examples"), len(models), len(sites), count) or [[None] * len(sites)
                                                                                 for _ in models]
    hidden = _grid(raw.get("suppressed"), len(models), len(sites), bool) or [[False] * len(sites) for _ in models]
    minimum_raw = raw.get("min_count")
    minimum = {str(k): int(v) for k, v in minimum_raw.items() if _finite(v) is not None} \
        if isinstance(minimum_raw, Mapping) else {}
    notes = raw.get("notes")
    return CrossSiteMatrix(models=tuple(models), data_sites=tuple(sites), metrics=metrics, num_examples=counts,
                           suppressed=hidden, min_count=minimum,
                           notes=dict(notes) if isinstance(notes, Mapping) else {}), ""
