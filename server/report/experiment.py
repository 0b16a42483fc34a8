"""The report's experiment section: every arm's balanced accuracy and ROC AUC per k, with 95% intervals.

``lungmae experiment`` writes ``experiment.json`` (and PNG plots) into its output directory. When the directory
a report is rendered from holds that file, the page gets a section with one table row per (arm, k) and a plot of
each metric against k per arm. The reader is deliberately lenient about spelling (docs/report.md lists the
accepted shapes): the experiment and the report are written separately, and a report that fails on a renamed
key would hide results that are there.

Accepted shapes, keys normalised to snake_case (``balanced-accuracy`` = ``balancedAccuracy`` =
``balanced_accuracy``):

* arms: ``{"arms": [{"name": .., "results": [...]}, ...]}`` or ``{"arms": {name: {"results": [...]}}}`` or
  ``{"arms": {name: [...]}}``; per-k results under ``results``/``by_k``/``per_k``/``points``, as a list of
  objects with ``k`` (or ``labels_per_class``) or as a mapping ``{"8": {...}}``;
* flat: ``{"results": [{"arm": .., "k": .., ...}, ...]}`` (also ``rows``);
* a metric value: a number, or ``{"mean"|"value"|"estimate"|"point": x, "ci95"|"ci"|"interval": [lo, hi]}`` or
  ``{..., "low"|"lo"|"ci_low": lo, "high"|"hi"|"ci_high": hi}``; or beside the metric in the row:
  ``balanced_accuracy_ci95: [lo, hi]`` / ``balanced_accuracy_low`` / ``balanced_accuracy_high``.
* optional: ``primary_endpoint`` (a string, or an object whose scalar fields are listed), ``seeds``, ``profile``,
  ``chance``; ``plots``/``figures``: PNG file names in the same directory, embedded as they are.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.report import plots
from server.report.data import norm_key

__all__ = ["EXPERIMENT_NAME", "ArmPoint", "Experiment", "read_experiment", "experiment_section"]

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "experiment.json"
METRICS: tuple[tuple[str, str], ...] = (("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC AUC"))
_VALUE_KEYS = ("mean", "value", "estimate", "point", "median")
_CI_KEYS = ("ci95", "ci_95", "ci", "interval", "bootstrap_ci", "ci95_bootstrap")
_LOW_KEYS = ("low", "lo", "ci_low", "lower", "ci95_low")
_HIGH_KEYS = ("high", "hi", "ci_high", "upper", "ci95_high")
_K_KEYS = ("k", "labels_per_class", "labelled_per_class", "labels")
_MAX_PNG_BYTES = 5_000_000


@dataclasses.dataclass(frozen=True)
class ArmPoint:
    """One arm at one k: ``metrics[name] = (value, low, high)`` (low/high None without an interval)."""

    k: float
    metrics: dict[str, tuple[float, float | None, float | None]]
    seeds: int | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
    """``experiment.json`` as the report reads it."""

    arms: dict[str, list[ArmPoint]]
    endpoint: list[tuple[str, str]]
    facts: list[tuple[str, str]]
    plots: list[Path]
    chance: float | None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _first(mapping: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in mapping:
            return mapping[key]
    return None


def _pair(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return _num(value[0]), _num(value[1])
    if isinstance(value, Mapping):
        v = {norm_key(k): x for k, x in value.items()}
        return _num(_first(v, _LOW_KEYS)), _num(_first(v, _HIGH_KEYS))
    return None, None


def _metric(row: Mapping[str, Any], name: str) -> tuple[float, float | None, float | None] | None:
    raw = row.get(name)
    low = high = None
    if isinstance(raw, Mapping):
        inner = {norm_key(k): v for k, v in raw.items()}
        value = _num(_first(inner, _VALUE_KEYS))
        low, high = _pair(_first(inner, _CI_KEYS))
        if low is None and high is None:
            low, high = _num(_first(inner, _LOW_KEYS)), _num(_first(inner, _HIGH_KEYS))
    else:
        value = _num(raw)
    if value is None:
        return None
    if low is None and high is None:
        low, high = _pair(_first(row, [f"{name}_{k}" for k in _CI_KEYS]))
    if low is None and high is None:
        low, high = (_num(_first(row, [f"{name}_{k}" for k in _LOW_KEYS])),
                     _num(_first(row, [f"{name}_{k}" for k in _HIGH_KEYS])))
    return value, low, high


def _point(row: Mapping[str, Any], k: Any = None) -> ArmPoint | None:
    row = {norm_key(key): v for key, v in row.items()}
    k_value = _num(k) if k is not None else _num(_first(row, _K_KEYS))
    if k_value is None and isinstance(k, str):
        try:
            k_value = float(k)
        except ValueError:
            k_value = None
    if k_value is None:
        return None
    metrics = {name: m for name, _ in METRICS if (m := _metric(row, name)) is not None}
    if not metrics:
        return None
    seeds = row.get("seeds")
    n_seeds = len(seeds) if isinstance(seeds, list) else (int(n) if (n := _num(seeds)) is not None else None)
    return ArmPoint(k=k_value, metrics=metrics, seeds=n_seeds)


def _points(raw: Any) -> list[ArmPoint]:
    if isinstance(raw, Mapping):
        inner = {norm_key(k): v for k, v in raw.items()}
        nested = _first(inner, ("results", "by_k", "per_k", "points", "ks"))
        if nested is not None:
            return _points(nested)
        out = [_point(v, k) for k, v in raw.items() if isinstance(v, Mapping)]
        return sorted((p for p in out if p is not None), key=lambda p: p.k)
    if isinstance(raw, list):
        out = [_point(v) for v in raw if isinstance(v, Mapping)]
        return sorted((p for p in out if p is not None), key=lambda p: p.k)
    return []


def _arm_name(obj: Mapping[str, Any], fallback: str) -> str:
    for key in ("name", "arm", "label", "id"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return fallback


def _scalars(obj: Any) -> list[tuple[str, str]]:
    if isinstance(obj, str):
        return [("", obj)]
    if not isinstance(obj, Mapping):
        return []
    out = []
    for key, value in obj.items():
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out.append((str(key), f"{value:.4g}" if isinstance(value, float) else str(value)))
        elif isinstance(value, list) and len(value) == 2 and all(_num(v) is not None for v in value):
            out.append((str(key), f"[{value[0]:.3f}, {value[1]:.3f}]"))
    return out


def read_experiment(directory: str | Path) -> tuple[Experiment | None, str]:
    """Read ``directory/experiment.json``; ``(None, "")`` when there is none, ``(None, why)`` when unusable."""
    path = Path(directory) / EXPERIMENT_NAME
    if not path.is_file():
        return None, ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{EXPERIMENT_NAME} could not be read ({exc.__class__.__name__}: {exc})."
    if not isinstance(data, Mapping):
        return None, f"{EXPERIMENT_NAME} must hold a JSON object; got {type(data).__name__}."
    top = {norm_key(k): v for k, v in data.items()}
    arms: dict[str, list[ArmPoint]] = {}
    raw_arms = top.get("arms")
    if isinstance(raw_arms, list):
        for i, arm in enumerate(raw_arms):
            if isinstance(arm, Mapping):
                arms[_arm_name(arm, f"arm {i + 1}")] = _points(arm)
    elif isinstance(raw_arms, Mapping):
        for name, arm in raw_arms.items():
            arms[_arm_name(arm, str(name)) if isinstance(arm, Mapping) else str(name)] = _points(arm)
    flat = _first(top, ("results", "rows"))
    if not arms and isinstance(flat, list):
        for row in flat:
            if isinstance(row, Mapping) and (p := _point(row)) is not None:
                arms.setdefault(_arm_name({norm_key(k): v for k, v in row.items()}, "arm"), []).append(p)
        arms = {name: sorted(points, key=lambda p: p.k) for name, points in arms.items()}
    arms = {name: points for name, points in arms.items() if points}
    if not arms:
        return None, (f"{EXPERIMENT_NAME} holds no arm with a balanced accuracy or ROC AUC per k (see docs/report.md "
                      "for the shapes the report reads).")
    names = _first(top, ("plots", "figures"))
    pngs: list[Path] = []
    root = path.parent.resolve()
    for name in (names if isinstance(names, list) else []):
        candidate = (root / str(name)).resolve() if isinstance(name, str) else None
        # Only PNG files inside the directory: the page must not pull in anything else from the disk.
        if candidate is not None and candidate.suffix.lower() == ".png" and root in candidate.parents \
                and candidate.is_file() and candidate.stat().st_size <= _MAX_PNG_BYTES:
            pngs.append(candidate)
    facts = [(k, v) for k, v in _scalars(data) if norm_key(k) in ("profile", "seeds", "device", "sites", "quick")]
    endpoint = _scalars(top.get("primary_endpoint") or top.get("endpoint"))
    return Experiment(arms=arms, endpoint=endpoint, facts=facts, plots=pngs, chance=_num(top.get("chance"))), ""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(m: tuple[float, float | None, float | None] | None) -> str:
    if m is None:
        return "&ndash;"
    value, low, high = m
    interval = f' <span class="ci">[{low:.3f}, {high:.3f}]</span>' if low is not None and high is not None else ""
    return f"{value:.3f}{interval}"


def experiment_section(directory: str | Path) -> str:
    """``<section id="experiment">`` when ``directory`` holds ``experiment.json``; ``""`` otherwise."""
    experiment, why = read_experiment(directory)
    head = '<section id="experiment"><h2>Experiment: accuracy against labels per arm</h2>'
    if experiment is None:
        return "" if not why else head + f'<p class="note absent">{_e(why)}</p></section>'
    parts = []
    if experiment.endpoint:
        items = "".join(f"<li>{_e(k) + ': ' if k else ''}{_e(v)}</li>" for k, v in experiment.endpoint)
        parts.append(f'<div class="privacy"><strong>Primary endpoint</strong><ul>{items}</ul></div>')
    if experiment.facts:
        parts.append('<p class="note">' + " &middot; ".join(f"{_e(k)}: {_e(v)}" for k, v in experiment.facts) + "</p>")
    figures = []
    for metric, label in METRICS:
        series = {arm: [(p.k, *p.metrics[metric]) for p in points if metric in p.metrics]
                  for arm, points in experiment.arms.items()}
        series = {arm: pts for arm, pts in series.items() if pts}
        if series:
            uri = plots.metric_vs_labels(series, title=f"{label} vs labelled scans per class (95% intervals)",
                                         ylabel=label, chance=experiment.chance if metric == "balanced_accuracy"
                                         else 0.5)
            figures.append(f'<figure><h3>{_e(label)}</h3><img src="{uri}" alt="{_e(label)} against k per arm">'
                           "</figure>")
    parts.append('<div class="figs">' + "".join(figures) + "</div>")
    rows = []
    for arm, points in experiment.arms.items():
        for p in points:
            rows.append(f'<tr><td class="name">{_e(arm)}</td><td>{p.k:g}</td>'
                        + "".join(f"<td>{_cell(p.metrics.get(m))}</td>" for m, _ in METRICS)
                        + f"<td>{'&ndash;' if p.seeds is None else p.seeds}</td></tr>")
    parts.append('<table id="experiment-table"><thead><tr><th class="name">arm</th><th>k</th>'
                 + "".join(f"<th>{_e(label)} [95% CI]</th>" for _, label in METRICS)
                 + f"<th>seeds</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    parts.append('<p class="note">k: labelled scans per class per site. Intervals as experiment.json gives them '
                 "(95%, bootstrap over test patients); an en dash where it gives none.</p>")
    for png in experiment.plots:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<figure><h3>{_e(png.stem)}</h3><img src=\"data:image/png;base64,{data}\" "
                     f"alt=\"{_e(png.stem)} (plot written by the experiment)\"></figure>")
    return head + "".join(parts) + "</section>"
