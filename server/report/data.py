"""Read a run directory (run_config.json, state.json, metrics.jsonl, metrics.json, checkpoints/) into plain records.

The report must render for any run the server left behind: a finished one, one that stopped after
pretraining, one without differential privacy, one whose last ``metrics.jsonl`` line was cut off by a
crash. So this reader turns the files into small frozen records whose optional parts are ``None`` or
empty, and the page leaves a section out (with a sentence saying why) instead of failing. Only files the
run directory must have, or files that are corrupt beyond a cut-off last line, raise
:class:`RunDirectoryError`, naming the file, the line and what was expected.

One vocabulary: each ``metrics.jsonl`` line is decoded by the contract's
:class:`lungmae_core.contract.RoundRecord` (snake_case keys, the same as on the wire and in
``metrics.json``); a line of another contract version is a :class:`RunDirectoryError` naming it. An
undefined metric (``null``: a class missing from a split, training metrics withheld under DP) is left out
of the numbers, so the page shows it as n/a, never as 0 or 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lungmae_core.contract import ContractError
from lungmae_core.contract import RoundRecord as WireRoundRecord
from lungmae_core.errors import LungMAEError

__all__ = [
    "RunDirectoryError",
    "SiteResult",
    "RoundRecord",
    "FinalResults",
    "RunRecord",
    "Reconstruction",
    "load_run",
    "norm_key",
    "series",
    "confusion_matrix",
]

logger = logging.getLogger(__name__)

# The final classification metrics, in the order the report's tables show them (CONTRACTS.md: snake_case).
FINAL_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc")
# evaluate_mae's keys: the MAE's masked L1 and the trivial "average patch" predictor's, overall and in lung.
MAE_METRICS: tuple[str, ...] = ("l1_masked", "baseline_l1_masked", "l1_masked_lung", "baseline_l1_masked_lung")
PARTICIPATION_KEYS: tuple[str, ...] = ("sampled", "replied", "failed", "rejected")


class RunDirectoryError(LungMAEError, ValueError):
    """A run directory is missing, is not a run directory, or holds a file that cannot be read."""


def norm_key(key: object) -> str:
    """A word-split form of a key for matching words in it: ``"rootCertificates"`` -> ``"root_certificates"``.

    Used by the page to recognise path-like configuration keys; metric keys need no normalising (one
    snake_case vocabulary).
    """
    text = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", str(key))
    return text.replace("-", "_").replace(" ", "_").lower()


def _number(value: Any) -> float | None:
    """A finite-or-not float from an int/float (not bool); ``None`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    """A count given as an int, as the list of the things counted (site names), or as counts by reason."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return int(value)
    if isinstance(value, Mapping):  # counts by reason ({"norm": 1, "non-finite": 0}) or site -> reason
        numbers = [_number(v) for v in value.values()]
        if numbers and all(n is not None for n in numbers):
            return int(sum(numbers))  # type: ignore[arg-type]
        return len(value)
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def _scalars(mapping: Any) -> dict[str, float]:
    """The numeric entries of a metrics mapping, keys normalised; non-numbers (lists, strings) dropped."""
    if not isinstance(mapping, Mapping):
        return {}
    out: dict[str, float] = {}
    for key, value in mapping.items():
        number = _number(value)
        if number is not None:
            out[str(key)] = number
    return out


@dataclasses.dataclass(frozen=True)
class SiteResult:
    """One site's final evaluation: scalar metrics plus its confusion matrix if it sent one."""

    metrics: dict[str, float]
    confusion_matrix: list[list[float]] | None = None


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``: what happened in one server round.

    ``train_sites``/``evaluate_sites`` map site name -> that site's reply metrics (snake_case keys,
    e.g. ``loss``, ``num_examples``, ``epsilon``); the ``*_aggregated`` dicts hold the server's aggregate.
    Participation counts and bytes are ``None`` when the server did not record them.
    """

    server_round: int
    phase: str
    train_aggregated: dict[str, float]
    train_sites: dict[str, dict[str, float]]
    evaluate_aggregated: dict[str, float]
    evaluate_sites: dict[str, dict[str, float]]
    participation: dict[str, int | None]
    bytes_up: float | None
    bytes_down: float | None
    skipped: bool
    note: str
    problems: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FinalResults:
    """The ``"final"`` section of ``metrics.json``: the final global classifier at every site, and pooled."""

    sites: dict[str, SiteResult]
    pooled: SiteResult | None
    class_names: tuple[str, ...]
    mae: dict[str, float]
    cross_site: dict[str, dict[str, float]]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """The MAE applied at the server to synthetic phantoms (:mod:`server.report.recon`), ready for the page.

    ``figure_uri`` is the PNG data URI of the slices; ``metrics`` are ``evaluate_mae``'s keys on the phantoms.
    """

    figure_uri: str
    metrics: dict[str, float]
    description: str


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Everything the report shows, read from one run directory.

    ``site_info`` is what each site said about itself when queried (``metrics.json`` ``"sites"``: counts of
    scans, ``dp_enabled``, ``epsilon_budget``, ``has_gpu``), keys snake_case; empty when absent.
    """

    run_config: dict[str, Any]
    state: dict[str, Any]
    rounds: tuple[RoundRecord, ...]
    summary: dict[str, Any]
    final: FinalResults | None
    checkpoints: tuple[Path, ...]
    warnings: tuple[str, ...]
    site_info: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def phases(self) -> tuple[str, ...]:
        """Phases in the order they first appear in ``metrics.jsonl``."""
        seen: list[str] = []
        for r in self.rounds:
            if r.phase not in seen:
                seen.append(r.phase)
        return tuple(seen)

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site name seen in a reply or in the final results, sorted (stable colours on the page)."""
        names: set[str] = set()
        for r in self.rounds:
            names.update(r.train_sites)
            names.update(r.evaluate_sites)
        if self.final is not None:
            names.update(self.final.sites)
        return tuple(sorted(names))


def _read_json(path: Path, *, required: bool) -> Any:
    if not path.exists():
        if required:
            raise RunDirectoryError(f"Unable to read {path} as it does not exist; a run directory written by "
                                    "the server always has it")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"Unable to parse {path} as it is not valid JSON (line {exc.lineno}, "
                                f"column {exc.colno}: {exc.msg})") from exc
    except OSError as exc:
        raise RunDirectoryError(f"Unable to read {path} as {exc.strerror or exc}") from exc


def _site_block(block: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``{"aggregated": {...}, "sites": {name: {...}}}`` -> (aggregated, per site), numbers only."""
    return _scalars(block["aggregated"]), {str(name): _scalars(m) for name, m in block["sites"].items()}


def _problems(items: Sequence[Mapping[str, Any]], what: str) -> tuple[str, ...]:
    """``[{"site", "check"?, "reason"}, ...]`` -> ``("rejected site0 (finite): non-finite values ...", ...)``."""
    out = []
    for item in items:
        site, check, reason = (item.get(k, "") for k in ("site", "check", "reason"))
        out.append(f"{what} {site}" + (f" ({check})" if check else "") + (f": {reason}" if reason else ""))
    return tuple(out)


def _round_from_line(obj: Any, where: str) -> RoundRecord:
    try:
        rec = WireRoundRecord.decode(obj)
    except ContractError as exc:
        raise RunDirectoryError(f"{where} is not a round record of this version: {exc}") from None
    train_agg, train_sites = _site_block(rec.train)
    eval_agg, eval_sites = _site_block(rec.evaluate)
    participation = {k: _count(rec.participation.get(k)) for k in PARTICIPATION_KEYS}
    return RoundRecord(
        server_round=rec.round, phase=rec.phase,
        train_aggregated=train_agg, train_sites=train_sites,
        evaluate_aggregated=eval_agg, evaluate_sites=eval_sites,
        participation=participation, bytes_up=_number(rec.bytes.get("up")), bytes_down=_number(rec.bytes.get("down")),
        skipped=rec.skipped, note=rec.note,
        problems=_problems(rec.rejected_updates, "rejected") + _problems(rec.failures, "failed"),
    )


def _read_rounds(path: Path, warnings: list[str]) -> tuple[RoundRecord, ...]:
    if not path.exists():
        warnings.append("metrics.jsonl is absent: no round finished, so there are no curves per round.")
        return ()
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    by_round: dict[int, RoundRecord] = {}
    for k, (lineno, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(numbered) - 1:  # a crash while appending cuts off the last line only
                warnings.append(f"metrics.jsonl line {lineno} is cut off and was left out (the run stopped "
                                "while writing it).")
                logger.warning("Skipping cut-off last line %d of %s", lineno, path)
                continue
            raise RunDirectoryError(f"Unable to parse {path} line {lineno} as it is not valid JSON "
                                    f"({exc.msg} at column {exc.colno}); each line must be one round") from exc
        record = _round_from_line(obj, f"{path} line {lineno}")
        # A resumed server may log a round again: the later line wins, as it describes the kept model.
        by_round[record.server_round] = record
    return tuple(by_round[r] for r in sorted(by_round))


def _site_result(obj: Any) -> SiteResult | None:
    if not isinstance(obj, Mapping):
        return None
    return SiteResult(metrics=_scalars(obj), confusion_matrix=confusion_matrix(obj.get("confusion_matrix")))


def confusion_matrix(value: Any) -> list[list[float]] | None:
    """A square matrix from nested rows or from a flat row-major list (the wire's form).

    Returns ``None`` for anything else (absent, not square, not numbers), so the page leaves it out.
    """
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(row, list) for row in value):
        rows = value
    else:
        side = math.isqrt(len(value))
        if side * side != len(value):
            return None
        rows = [value[i * side:(i + 1) * side] for i in range(side)]
    if any(len(row) != len(rows) for row in rows):
        return None
    if not all(_number(v) is not None for row in rows for v in row):
        return None
    return [[float(v) for v in row] for row in rows]


def _final_results(summary: Mapping[str, Any], run_config: Mapping[str, Any]) -> FinalResults | None:
    final = summary.get("final")
    if not isinstance(final, Mapping):
        return None
    sites_raw = final.get("sites", {})
    sites: dict[str, SiteResult] = {}
    if isinstance(sites_raw, Mapping):
        for name, obj in sites_raw.items():
            result = _site_result(obj)
            if result is not None:
                sites[str(name)] = result
    pooled = _site_result(final.get("pooled"))
    if pooled is not None and not pooled.metrics and pooled.confusion_matrix is None:
        pooled = None  # the server writes {} when no site evaluated
    names = final.get("class_names") or summary.get("class_names") or run_config.get("class_names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        names = []
    mae = {k: v for k, v in _scalars(final.get("mae")).items() if k in MAE_METRICS or k == "num_examples"}
    cross_raw = final.get("cross_site", {})
    cross: dict[str, dict[str, float]] = {}
    if isinstance(cross_raw, Mapping) and "models" not in cross_raw:  # the old {site: metrics} form only
        cross = {str(k): _scalars(v) for k, v in cross_raw.items() if isinstance(v, Mapping)}
    note = final.get("note", "")
    return FinalResults(sites=sites, pooled=pooled, class_names=tuple(names), mae=mae, cross_site=cross,
                        note=note if isinstance(note, str) else "")


def load_run(run_dir: str | Path) -> RunRecord:
    """Read everything the report needs from ``run_dir``.

    Args:
        run_dir: a run directory written by the server (``run-dir`` in ``federation.yaml``).

    Returns:
        A :class:`RunRecord`; parts the run did not reach are empty or ``None`` and explained in
        ``warnings``.

    Raises:
        RunDirectoryError: ``run_dir`` does not exist, has neither ``run_config.json`` nor
            ``metrics.jsonl``, or holds a JSON file (or a ``metrics.jsonl`` line before the last) that
            cannot be parsed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"Unable to read run directory {run_dir} as it does not exist or is not a directory")
    if not (run_dir / "run_config.json").exists() and not (run_dir / "metrics.jsonl").exists():
        inner = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / "run_config.json").exists()]
        hint = f"; did you mean {inner[0]}?" if inner else ""  # e.g. the simulate workdir instead of WORKDIR/run
        raise RunDirectoryError(f"Unable to read run directory {run_dir} as it has neither run_config.json nor "
                                f"metrics.jsonl; pass the directory the server wrote (federation.yaml 'run-dir'){hint}")
    warnings: list[str] = []
    run_config = _read_json(run_dir / "run_config.json", required=False)
    if run_config is None:
        warnings.append("run_config.json is absent: the configuration summary is left out.")
        run_config = {}
    if not isinstance(run_config, Mapping):
        raise RunDirectoryError(f"{run_dir / 'run_config.json'} must hold a JSON object; "
                                f"got {type(run_config).__name__}")
    state = _read_json(run_dir / "state.json", required=False) or {}
    summary = _read_json(run_dir / "metrics.json", required=False)
    if summary is None:
        warnings.append("metrics.json is absent: the run has not finished, so there are no final results.")
        summary = {}
    if not isinstance(summary, Mapping):
        raise RunDirectoryError(f"{run_dir / 'metrics.json'} must hold a JSON object; got {type(summary).__name__}")
    rounds = _read_rounds(run_dir / "metrics.jsonl", warnings)
    ckpt_dir = run_dir / "checkpoints"
    checkpoints = tuple(sorted(p for p in ckpt_dir.iterdir() if p.is_file() and not p.name.startswith("."))) \
        if ckpt_dir.is_dir() else ()
    sites_raw = summary.get("sites", {})
    site_info = {str(name): dict(v) for name, v in sites_raw.items() if isinstance(v, Mapping)} \
        if isinstance(sites_raw, Mapping) else {}
    return RunRecord(
        run_config=dict(run_config), state=dict(state) if isinstance(state, Mapping) else {},
        rounds=rounds, summary=dict(summary), final=_final_results(summary, run_config),
        checkpoints=checkpoints, warnings=tuple(warnings), site_info=site_info,
    )


def series(rounds: Sequence[RoundRecord], phase: str, key: str, *, part: str = "train") -> tuple[
        dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """Per-site and aggregated ``(server_round, value)`` series of metric ``key`` in ``phase``.

    Args:
        rounds: the run's rounds.
        phase: ``"pretrain"``, ``"finetune"``, ...
        key: a snake_case metric key, e.g. ``"loss"`` or ``"epsilon"``.
        part: ``"train"`` (fit replies) or ``"evaluate"``. Defaults to ``"train"``.

    Returns:
        ``(per_site, aggregated)``; non-finite values are dropped (a plot cannot show them; the
        tables do).
    """
    per_site: dict[str, list[tuple[int, float]]] = {}
    aggregated: list[tuple[int, float]] = []
    for r in rounds:
        if r.phase != phase:
            continue
        sites = r.train_sites if part == "train" else r.evaluate_sites
        agg = r.train_aggregated if part == "train" else r.evaluate_aggregated
        for site, metrics in sites.items():
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                per_site.setdefault(site, []).append((r.server_round, value))
        value = agg.get(key)
        if value is not None and math.isfinite(value):
            aggregated.append((r.server_round, value))
    return per_site, aggregated
