"""``lungmae site prepare``: a hospital's DICOM/NIfTI tree becomes a checked, preprocessed, pseudonymous cache.

Steps (each series ends as one manifest row, accepted or rejected with a specific reason):

1. index the input tree from DICOM headers (:func:`lungmae_core.dicom.index_tree`); NIfTI files are
   one series each, with the file name (without ``.nii``/``.nii.gz``) as patient id;
2. check every series from its headers (:func:`~lungmae_core.dicom.plan_series`) and keep one per study
   (:func:`~lungmae_core.dicom.choose_per_study`);
3. in worker processes: assemble the HU volume, run :func:`~lungmae_core.preprocess.preprocess_volume`,
   write the sample atomically (:func:`~lungmae_core.cache.write_sample`). The cache key hashes the source
   (SOP Instance UIDs + file sizes + mtimes, see :meth:`DicomSeries.fingerprint`), the series rules and the
   preprocessing parameters: a rerun reuses every sample whose key exists and redoes what changed.
   Series refused by preprocessing (implausible lungs) are remembered in ``rejections/<key>.json`` so a
   rerun does not recompute them either;
4. match labels (``labels.csv``), assign train/val/test splits by patient (deterministic: site seed and the
   source's patient ids, so a new site secret does not reshuffle them);
5. write ``manifest.csv``, ``label-issues.csv`` (CSV line numbers only) and ``datacard.json`` (aggregates
   only: what may be shared with the consortium).

Identifiers stay at the site: rows, logs above DEBUG and messages use pseudonyms (HMAC-SHA256 with the
site secret) or indices, never names, UIDs or paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client.datacard import data_card
from client.labels import LabelIssue, LabelTable, read_labels
from client.prepare_worker import run_workers
from client.pseudonym import Pseudonymizer, load_or_create_secret
from client.site_config import SiteConfig
from lungmae_core.atomic import atomic_write_text
from lungmae_core.cache import cache_key, read_sample_meta, remove_stale_temp_files, sample_path
from lungmae_core.dicom import (
    REJECTION_CODES,
    DicomSeries,
    SeriesRejected,
    SeriesRules,
    SlicePlan,
    choose_per_study,
    index_tree,
    plan_series,
)
from lungmae_core.errors import SiteConfigError
from lungmae_core.manifest import ManifestRow, write_manifest

__all__ = ["PrepareReport", "prepare_site", "DATACARD_NAME", "LABEL_ISSUES_NAME", "LOADER_VERSION"]

logger = logging.getLogger(__name__)

DATACARD_NAME = "datacard.json"
# Rejections every export has (not problems with the data): logged at DEBUG, counted in the summary.
_ROUTINE_REJECTIONS = {"scout", "not-ct", "not-ct-image", "not-an-image", "not-chosen"}
LABEL_ISSUES_NAME = "label-issues.csv"
REJECTIONS_DIR = "rejections"
LOADER_VERSION = 1  # bump when lungmae_core/dicom/ or nifti.py change the volumes they build: part of every cache key



@dataclasses.dataclass(frozen=True)
class PrepareReport:
    """What :func:`prepare_site` did; ``summary()`` is what ``lungmae site prepare`` prints.

    Attributes:
        rejections: ``{code: count}`` for rejected rows, codes from :data:`lungmae_core.dicom.REJECTION_CODES`.
        examples: ``{code: one full reason}`` for the summary.
        notes: repairs made to accepted series (e.g. resampled spacing), prefixed by the series pseudonym.
        reused / processed: accepted samples found in the cache / computed in this run.
    """

    cache_dir: Path
    manifest_path: Path
    datacard_path: Path
    n_rows: int
    accepted: int
    rejected: int
    reused: int
    processed: int
    rejections: dict[str, int]
    examples: dict[str, str]
    notes: tuple[str, ...]
    label_issues: tuple[LabelIssue, ...]
    labelled: int
    seconds: float
    removed: int = 0
    unlabelled: int = 0
    unknown_labels: dict[str, int] = dataclasses.field(default_factory=dict)
    classes: tuple[str, ...] = ()

    def summary(self) -> str:
        """A short human-readable summary: counts, then each rejection reason with its count."""
        lines = [f"Prepared {self.n_rows} series/files in {self.seconds:.1f} s: {self.accepted} accepted "
                 f"({self.processed} preprocessed, {self.reused} reused from the cache), {self.rejected} rejected; "
                 f"{self.labelled} accepted series labelled, {self.unlabelled} unlabelled."]
        if self.unknown_labels:
            rows = sum(self.unknown_labels.values())
            named = ", ".join(f"{name!r} x{n}" for name, n in self.unknown_labels.items())
            lines.append(f"Labels outside the federation's classes ({', '.join(self.classes)}): {rows} row(s) left "
                         f"unlabelled: {named}. Fix labels.csv or the class list (data: classes).")
        if self.rejections:
            lines.append("Rejected:")
            for code, count in sorted(self.rejections.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {count:4d}  {code}: {self.examples.get(code, REJECTION_CODES.get(code, ''))}")
        if self.notes:
            lines.append("Repaired:")
            lines.extend(f"  {note}" for note in self.notes)
        if self.label_issues:
            lines.append(f"Labels: {len(self.label_issues)} issue(s) (see {LABEL_ISSUES_NAME}):")
            lines.extend(f"  {issue.message}" for issue in self.label_issues[:20])
            if len(self.label_issues) > 20:
                lines.append(f"  ... and {len(self.label_issues) - 20} more")
        if self.removed:
            lines.append(f"Removed {self.removed} cached file(s) of series no longer in the input or made with other "
                         "settings.")
        lines.append(f"Manifest: {self.manifest_path}")
        lines.append(f"Data card: {self.datacard_path}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Entry:
    """One future manifest row while it is being worked on (identifiers stay in here, at the site)."""

    series_id: str
    patient_id: str
    study_id: str
    source: str
    raw_patient: str = ""
    raw_study: str = ""
    raw_accession: str = ""
    series: DicomSeries | None = None
    nifti_path: str | None = None
    plan: SlicePlan | None = None
    fingerprint: str = ""
    code: str = ""
    reason: str = ""
    key: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    reused: bool = False

    @property
    def accepted(self) -> bool:
        return not self.code and bool(self.key)

    def reject(self, code: str, reason: str) -> None:
        self.code, self.reason = code, reason


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _rules_fingerprint(rules: SeriesRules) -> str:
    return json.dumps({"loader": LOADER_VERSION, **dataclasses.asdict(rules)}, sort_keys=True)


def _prune(cache_dir: Path, keep: set[str]) -> int:
    """Delete samples and remembered refusals whose key this run did not produce; returns how many.

    Their series left the input, or changed, or were made with other settings: nothing reads them any more
    (the manifest is the index of the cache), and on real data each is megabytes.
    """
    removed = 0
    for folder, suffix in ((cache_dir / "samples", ".npz"), (cache_dir / REJECTIONS_DIR, ".json")):
        if not folder.is_dir():
            continue
        for path in folder.glob(f"*{suffix}"):
            if path.name[:-len(suffix)] not in keep:
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.info("Removed %d stale cached file(s)", removed)
    return removed


def _atomic_write_text(path: Path, text: str) -> None:
    """Files derived from patient data stay readable by the site's own user only."""
    atomic_write_text(path, text, mode=0o600)


def _nifti_stem(path: str) -> str:
    name = os.path.basename(path)
    return name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]


def _index(input_dir: Path, pseudo: Pseudonymizer, rules: SeriesRules, progress: bool,
           workers: int) -> list[_Entry]:
    """Index the tree and check every series from headers; returns one entry per future manifest row."""
    index = index_tree(input_dir, progress=progress, workers=workers)
    entries: list[_Entry] = []
    for skipped in index.skipped:
        rel = os.path.relpath(skipped.path, input_dir)
        entry = _Entry(series_id=pseudo.pseudonym("file", rel), patient_id="", study_id="",
                       source="folder" if skipped.code == "empty-folder" else "file")
        entry.reject(skipped.code, skipped.message)
        entries.append(entry)
    candidates: list[tuple[DicomSeries, SlicePlan]] = []
    by_uid: dict[str, _Entry] = {}
    for series in index.series:
        entry = _Entry(series_id=pseudo.series(series.series_uid), patient_id=pseudo.patient(series.patient_id),
                       study_id=pseudo.study(series.study_uid), source="dicom", raw_patient=series.patient_id,
                       raw_study=series.study_uid, raw_accession=series.accession_number, series=series)
        entry.info = {"rows": series.instances[0].rows, "columns": series.instances[0].columns,
                      "manufacturer": series.manufacturer}
        try:
            entry.plan = plan_series(series, rules)
            candidates.append((series, entry.plan))
            entry.fingerprint = series.fingerprint() + _rules_fingerprint(rules)
        except SeriesRejected as exc:
            entry.reject(exc.code, str(exc))
        entries.append(entry)
        by_uid[series.series_uid] = entry
    chosen = choose_per_study(candidates)
    for uid, best in chosen.items():
        if uid != best:
            winner = by_uid[best]
            by_uid[uid].reject("not-chosen", f"series {winner.series_id} of the same study was chosen instead "
                                             "(rule: thinnest slices, then most slices, then most pixels)")
    for path in index.nifti:
        rel = os.path.relpath(path, input_dir)
        stem = _nifti_stem(path)
        entry = _Entry(series_id=pseudo.series("nifti:" + rel), patient_id=pseudo.patient(stem),
                       study_id=pseudo.study("nifti:" + rel), source="nifti", raw_patient=stem, nifti_path=path)
        stat = os.stat(path)
        entry.fingerprint = _hash(f"nifti|{rel}|{stat.st_size}|{stat.st_mtime_ns}|{LOADER_VERSION}")
        entries.append(entry)
    return entries


def _apply_labels(entries: list[_Entry], table: LabelTable | None) -> dict[str, str]:
    """Labels by series id for accepted and rejected entries; reports unmatched labelled ids."""
    labels: dict[str, str] = {}
    if table is None:
        return labels
    keys_by_kind: dict[str, Callable[[_Entry], tuple[str, ...]]] = {
        "patient": lambda e: (e.raw_patient, e.patient_id),
        "study": lambda e: (e.raw_study, e.study_id),
        "accession": lambda e: (e.raw_accession,),
    }
    matched: set[str] = set()
    accepted: set[str] = set()
    for entry in entries:
        if entry.source not in ("dicom", "nifti"):
            continue
        keys = [k for k in keys_by_kind[table.id_kind](entry) if k]
        hits = [k for k in keys if k in table.labels or k in table.lines]
        if not hits:
            continue
        matched.update(hits)
        if entry.accepted:
            accepted.update(hits)
        label = table.lookup(*keys)
        if label is not None:
            labels[entry.series_id] = label
    table.report_unmatched(matched, accepted)
    return labels


def _row(entry: _Entry, label: str, split: str) -> ManifestRow:
    info = entry.info
    spacing = info.get("spacing_mm") or [None, None, None]
    plan = entry.plan
    return ManifestRow(
        series_id=entry.series_id, patient_id=entry.patient_id, study_id=entry.study_id, source=entry.source,
        status="accepted" if entry.accepted else "rejected",
        reason="" if entry.accepted else f"{entry.code}: {entry.reason}",
        label=label, split=split,
        cache_file=f"samples/{entry.key}.npz" if entry.accepted else "",
        cache_key=entry.key if entry.accepted else "",
        n_slices=info.get("n_slices") if entry.accepted else (len(plan.order) if plan else None),
        rows=info.get("rows"), columns=info.get("columns"),
        spacing_d_mm=spacing[0] if entry.accepted else (plan.spacing_mm if plan else None),
        spacing_h_mm=spacing[1] if entry.accepted else (plan.pixel_spacing[0] if plan else None),
        spacing_w_mm=spacing[2] if entry.accepted else (plan.pixel_spacing[1] if plan else None),
        slice_thickness_mm=plan.slice_thickness_mm if plan else (spacing[0] if entry.accepted else None),
        manufacturer=str(info.get("manufacturer", "")),
        lung_volume_ml=info.get("lung_volume_ml"),
        hu_mean=info.get("hu_mean"), hu_std=info.get("hu_std"), hu_p05=info.get("hu_p05"),
        hu_p50=info.get("hu_p50"), hu_p95=info.get("hu_p95"),
    )


def prepare_site(cfg: SiteConfig, *, input_dir: str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, labels: str | os.PathLike[str] | None = None,
                 workers: int | None = None, progress: bool = True,
                 class_names: Sequence[str] | None = None) -> PrepareReport:
    """Prepare one site's cache from its DICOM/NIfTI input.

    Args:
        cfg: the site configuration (``data``, ``preprocess``, ``site.seed`` are used).
        input_dir: overrides ``data.input``.
        cache_dir: overrides ``data.cache``.
        labels: overrides ``data.labels`` (a labels CSV).
        workers: overrides ``data.workers`` (processes preprocessing in parallel).
        progress: show tqdm progress bars.
        class_names: the federation's class list; defaults to ``data.classes`` of the site config.

    Returns:
        A :class:`PrepareReport`; the manifest, label issues and data card are written in the cache.

    Raises:
        SiteConfigError: no input or cache folder given, the input folder missing, an invalid labels CSV
            or site secret; with ``data.strict-labels``, any label outside the class list (each one named).
    """
    from lungmae_core.data import assign_splits

    start = time.perf_counter()
    data = cfg.data
    input_path = Path(input_dir) if input_dir is not None else data.input
    cache_path = Path(cache_dir) if cache_dir is not None else data.cache
    labels_path = Path(labels) if labels is not None else data.labels
    n_workers = int(workers) if workers is not None else data.workers
    if input_path is None:
        raise SiteConfigError(f"{cfg.source}: no input folder: pass --input or set 'data: input' in site.yaml")
    if cache_path is None:
        raise SiteConfigError(f"{cfg.source}: no cache folder: pass --cache or set 'data: cache' in site.yaml")
    if not input_path.is_dir():
        raise SiteConfigError(f"Unable to prepare from {input_path} as it is not a folder; check --input or "
                              "'data: input'")
    if n_workers < 1:
        raise SiteConfigError(f"Unable to use {n_workers} workers; pass --workers 1 or more")
    cache_path.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(cache_path)
    secret_file = data.secret_file or cache_path / "site-secret.key"
    pseudo = Pseudonymizer(load_or_create_secret(secret_file, legacy=cache_path / "site-secret.key"))
    classes = tuple(class_names or data.classes)
    table = read_labels(labels_path, classes) if labels_path is not None else None
    if table is not None and table.unknown and data.strict_labels:
        named = ", ".join(f"{name!r} ({n} rows)" for name, n in table.unknown_labels().items())
        raise SiteConfigError(f"Unable to prepare as {labels_path} uses labels outside the federation's classes "
                              f"({', '.join(classes)}): {named}; fix the CSV or data: classes in {cfg.source}")
    rules = data.series_rules()

    entries = _index(input_path, pseudo, rules, progress, n_workers)
    tasks: list[dict[str, Any]] = []
    for entry in entries:
        if entry.code or entry.source not in ("dicom", "nifti"):
            continue
        entry.key = cache_key(entry.fingerprint, cfg.preprocess)
        done = sample_path(cache_path, entry.key)
        refused = cache_path / REJECTIONS_DIR / f"{entry.key}.json"
        if done.is_file():
            try:
                entry.info.update(read_sample_meta(done).get("info", {}))
                entry.reused = True
                continue
            except Exception:  # a corrupt sample is simply redone
                logger.warning("Cached sample of series %s is unreadable; preparing it again", entry.series_id)
        if refused.is_file():
            try:
                saved = json.loads(refused.read_text(encoding="utf-8"))
                entry.reject(saved["code"], saved["reason"])
                continue
            except (OSError, ValueError, KeyError):
                pass
        tasks.append({"series_id": entry.series_id, "series": entry.series, "nifti_path": entry.nifti_path,
                      "plan": entry.plan, "rules": rules, "preprocess": cfg.preprocess, "cache_dir": str(cache_path),
                      "key": entry.key, "notes": entry.plan.notes if entry.plan else ()})
    logger.info("Indexed %d series/files; %d to preprocess, %d already in the cache", len(entries), len(tasks),
                sum(e.reused for e in entries))
    results = run_workers(tasks, n_workers, progress)
    by_id = {e.series_id: e for e in entries}
    for series_id, result in results.items():
        entry = by_id[series_id]
        if result["ok"]:
            entry.info.update(result["info"])
        else:
            entry.reject(result["code"], result["reason"])
            if result.get("final"):
                _atomic_write_text(cache_path / REJECTIONS_DIR / f"{entry.key}.json",
                                   json.dumps({"code": result["code"], "reason": result["reason"]}))

    # Labels, then splits by patient over the accepted labelled series. Splits are drawn over the source's own
    # patient ids (in memory only; the manifest holds pseudonyms), not over the pseudonyms: a new site secret
    # (a lost key, a fresh copy of the data) must not move patients between train and test, and the same data
    # with the same site seed gives the same splits wherever it is prepared.
    label_of = _apply_labels(entries, table)
    patient_label: dict[str, str] = {}
    for entry in sorted(entries, key=lambda e: (e.raw_patient, e.raw_study, e.series_id)):
        if entry.accepted and entry.series_id in label_of:
            patient_label.setdefault(entry.raw_patient, label_of[entry.series_id])
    splits = (assign_splits(sorted(patient_label), seed=cfg.site.seed, labels=patient_label)
              if patient_label else {})
    rows: list[ManifestRow] = []
    notes: list[str] = []
    note_counts: Counter[str] = Counter()
    for entry in entries:
        label = label_of.get(entry.series_id, "")
        split = ""
        if entry.accepted:
            split = splits.get(entry.raw_patient, "train") if label else "train"
            if entry.plan is not None:
                for note in entry.plan.notes:
                    notes.append(f"{entry.series_id}: {note}")
                    note_counts["resampled" if note.startswith("resampled") else "duplicate-copies"] += 1
        rows.append(_row(entry, label, split))
    ordered = sorted(entries, key=lambda e: e.series_id)
    for number, entry in enumerate(ordered, start=1):
        if entry.code:  # scouts, dose screens and the like are expected in every export: no need to shout
            logger.log(logging.DEBUG if entry.code in _ROUTINE_REJECTIONS else logging.INFO,
                       "Unable to use series %d of %d (%s) as %s", number, len(ordered), entry.series_id,
                       entry.reason)
    manifest_path = write_manifest(cache_path, rows)
    removed = _prune(cache_path, {e.key for e in entries if e.key})
    label_issues = tuple(table.issues) if table is not None else ()
    issue_lines = ["line,kind,message"] + [
        f"{i.line},{i.kind},\"{i.message.replace(chr(34), chr(39))}\"" for i in sorted(label_issues,
                                                                                       key=lambda i: i.line)]
    _atomic_write_text(cache_path / LABEL_ISSUES_NAME, "\n".join(issue_lines) + "\n")
    card = data_card(cfg.site.name, rows, Counter(e.code for e in entries if e.code), cfg.preprocess,
                     table.counts() if table is not None else {}, note_counts)
    datacard_path = cache_path / DATACARD_NAME
    _atomic_write_text(datacard_path, json.dumps(card, indent=2, sort_keys=False) + "\n")

    rejected = [e for e in entries if e.code]
    examples: dict[str, str] = {}
    for entry in rejected:
        examples.setdefault(entry.code, entry.reason)
    report = PrepareReport(
        cache_dir=cache_path, manifest_path=manifest_path, datacard_path=datacard_path, n_rows=len(rows),
        accepted=len(rows) - len(rejected), rejected=len(rejected),
        reused=sum(1 for e in entries if e.accepted and e.reused),
        processed=sum(1 for e in entries if e.accepted and not e.reused),
        rejections=dict(Counter(e.code for e in rejected)), examples=examples, notes=tuple(notes),
        label_issues=label_issues, labelled=sum(1 for r in rows if r.accepted and r.label),
        seconds=time.perf_counter() - start, removed=removed,
        unlabelled=sum(1 for r in rows if r.accepted and not r.label),
        unknown_labels=table.unknown_labels() if table is not None else {}, classes=classes)
    logger.info("Prepared site %s: %d accepted, %d rejected", cfg.site.name, report.accepted, report.rejected)
    return report
