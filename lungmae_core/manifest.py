"""The site manifest: one CSV row per series with its status, reason, split and quality figures.

``<cache>/manifest.csv`` is what hospital IT reads to see what was accepted, what was rejected and why, and
what :class:`lungmae_core.data.CachedVolumes` reads to find the samples. It holds pseudonymous ids only
(keyed hashes), never names, UIDs or file paths of the source, and it stays at the site.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import typing
from collections.abc import Iterable
from pathlib import Path

from lungmae_core.atomic import atomic_write_text
from lungmae_core.errors import CacheError, read_text

__all__ = ["MANIFEST_NAME", "MANIFEST_COLUMNS", "ManifestRow", "write_manifest", "read_manifest", "STATUSES",
           "SPLITS"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
STATUSES = ("accepted", "rejected")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One series in the site manifest (docs/CONTRACTS.md).

    ``status`` is ``accepted`` (then ``reason`` is empty and ``cache_file`` names the sample, relative to
    the cache directory) or ``rejected`` (then ``reason`` says why). ``split`` is ``train``/``val``/``test``
    or empty; ``label`` is a class name or empty. Numbers the series did not yield are ``None``.
    """

    series_id: str
    patient_id: str
    study_id: str
    source: str
    status: str
    reason: str = ""
    label: str = ""
    split: str = ""
    cache_file: str = ""
    cache_key: str = ""
    n_slices: int | None = None
    rows: int | None = None
    columns: int | None = None
    spacing_d_mm: float | None = None
    spacing_h_mm: float | None = None
    spacing_w_mm: float | None = None
    slice_thickness_mm: float | None = None
    manufacturer: str = ""
    lung_volume_ml: float | None = None
    hu_mean: float | None = None
    hu_std: float | None = None
    hu_p05: float | None = None
    hu_p50: float | None = None
    hu_p95: float | None = None

    def __post_init__(self) -> None:
        if not self.series_id:
            raise CacheError("manifest row: 'series_id' must not be empty")
        if self.status not in STATUSES:
            raise CacheError(f"manifest row {self.series_id}: 'status' must be one of {', '.join(STATUSES)}; "
                             f"got {self.status!r}")
        if self.status == "rejected" and not self.reason:
            raise CacheError(f"manifest row {self.series_id}: a rejected series needs a 'reason'")
        if self.status == "accepted" and (self.reason or not self.cache_file):
            raise CacheError(f"manifest row {self.series_id}: an accepted series needs a 'cache_file' and no "
                             f"'reason'; got cache_file={self.cache_file!r}, reason={self.reason!r}")
        if self.split not in ("",) + SPLITS:
            raise CacheError(f"manifest row {self.series_id}: 'split' must be empty or one of {', '.join(SPLITS)}; "
                             f"got {self.split!r}")

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


MANIFEST_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ManifestRow))
_TYPES = typing.get_type_hints(ManifestRow)


def _format(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 4)) if math.isfinite(value) else ""
    return str(value)


def write_manifest(cache_dir: str | os.PathLike[str], rows: Iterable[ManifestRow]) -> Path:
    """Write ``<cache>/manifest.csv`` atomically (temporary file + ``os.replace``), rows sorted by series id.

    Returns:
        The manifest path.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / MANIFEST_NAME
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for row in sorted(rows, key=lambda r: r.series_id):
        writer.writerow([_format(getattr(row, c)) for c in MANIFEST_COLUMNS])
    atomic_write_text(final, buf.getvalue(), mode=0o600)  # pseudonymous, but per-scan: the site's user only
    return final


def _parse(value: str, tp: object, where: str) -> object:
    if tp is str:
        return value
    if value == "":
        return None
    base = next(a for a in typing.get_args(tp) if a is not type(None))
    try:
        return int(value) if base is int else float(value)
    except ValueError:
        raise CacheError(f"{where} must be {'an integer' if base is int else 'a number'} or empty; "
                         f"got {value!r}") from None


def read_manifest(cache_dir: str | os.PathLike[str]) -> list[ManifestRow]:
    """Read and check ``<cache>/manifest.csv``.

    Raises:
        CacheError: naming the file (and line and column) when it is missing, has missing or unknown
            columns, or holds a bad value.
    """
    path = Path(cache_dir) / MANIFEST_NAME
    text = read_text(path, CacheError, fix="run `lungmae site prepare` first")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if missing or unknown:
        raise CacheError(f"Unable to read {path} as its header does not match: missing columns "
                         f"{missing or 'none'}, unknown columns {unknown or 'none'}")
    rows = []
    for line_no, record in enumerate(reader, start=2):
        values: dict[str, typing.Any] = {}  # each column parsed to its own type (_TYPES); ManifestRow checks them
        for col in MANIFEST_COLUMNS:
            raw = record.get(col)
            if raw is None:
                raise CacheError(f"{path}: line {line_no} has too few fields (no '{col}')")
            values[col] = _parse(raw, _TYPES[col], f"{path}: line {line_no}, column '{col}'")
        try:
            rows.append(ManifestRow(**values))
        except CacheError as exc:
            raise CacheError(f"{path}: line {line_no}: {exc}") from exc
    return rows
