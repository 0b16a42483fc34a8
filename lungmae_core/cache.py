"""The site cache of preprocessed samples: one ``.npz`` per series, written atomically, keyed by content.

A sample is written to a temporary name in the same directory, flushed to disk and then renamed with
``os.replace`` (atomic on POSIX and Windows), so a crash or a killed worker never leaves a partial file
under a final name; readers only ever see complete samples or none. The key hashes the source series
and the preprocessing parameters, so re-running ``lungmae site prepare`` skips what is done and redoes
what changed.

Layout (docs/CONTRACTS.md): ``<cache>/samples/<cache_key>.npz`` with arrays ``image (1,S,S,S) float32``,
``lung_mask (1,S,S,S) uint8`` and ``meta`` (a JSON string: ``{"format": 1, "qc": {...}, "meta": {...}}``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lungmae_core.atomic import atomic_path
from lungmae_core.config import PreprocessConfig
from lungmae_core.errors import CacheError
from lungmae_core.preprocess import Sample

__all__ = ["SAMPLES_DIR", "cache_key", "sample_path", "write_sample", "read_sample", "read_sample_meta",
           "remove_stale_temp_files"]

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
CACHE_FORMAT = 1
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")
_TMP_SUFFIX = ".tmp"


def cache_key(source_fingerprint: str, preprocess_cfg: PreprocessConfig) -> str:
    """32-hex-digit key of a sample: hash of the source's fingerprint and the preprocessing parameters.

    Args:
        source_fingerprint: anything that changes when the source changes (e.g. a hash of the series UID,
            instance UIDs and file sizes). It is hashed, so it may hold identifiers: they never reach disk.
        preprocess_cfg: its :meth:`PreprocessConfig.fingerprint` is part of the key.
    """
    if not source_fingerprint:
        raise CacheError("Unable to make a cache key as the source fingerprint is empty")
    text = f"{source_fingerprint}\n{preprocess_cfg.fingerprint()}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def sample_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """Where the sample with ``key`` lives: ``<cache>/samples/<key>.npz``."""
    if not _KEY_RE.match(key):
        raise CacheError(f"Unable to use cache key {key!r} as it must be 8-64 lowercase hex digits")
    return Path(cache_dir) / SAMPLES_DIR / f"{key}.npz"


def _check_sample(sample: Sample, where: str) -> None:
    image, mask = sample.image, sample.lung_mask
    if image.ndim != 4 or image.shape[0] != 1 or len(set(image.shape[1:])) != 1:
        raise CacheError(f"{where}: image must have shape (1, S, S, S); got {image.shape}")
    if mask.shape != image.shape:
        raise CacheError(f"{where}: lung_mask shape {mask.shape} differs from image shape {image.shape}")
    if image.dtype != np.float32 or mask.dtype != np.uint8:
        raise CacheError(f"{where}: image must be float32 and lung_mask uint8; got {image.dtype} and {mask.dtype}")


def write_sample(cache_dir: str | os.PathLike[str], key: str, sample: Sample, meta: dict[str, Any] | None = None,
                 ) -> Path:
    """Write ``sample`` to ``<cache>/samples/<key>.npz`` atomically (temporary file + ``os.replace``).

    Args:
        cache_dir: the site cache directory (created if missing).
        key: from :func:`cache_key`.
        sample: image ``(1, S, S, S)`` float32 and lung mask uint8 of the same shape, plus ``qc``.
        meta: JSON-serialisable facts to keep beside it (pseudonymous ids, label, source kind).

    Returns:
        The final path.

    Raises:
        CacheError: bad key or sample, metadata that is not JSON, or a failed write (no file is left
            under the final name; the temporary file is removed).
    """
    final = sample_path(cache_dir, key)
    _check_sample(sample, f"sample {key}")
    try:
        meta_json = json.dumps({"format": CACHE_FORMAT, "qc": sample.qc, "meta": meta or {}}, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"Unable to write sample {key} as its qc/meta is not JSON-serialisable: {exc}") from exc
    try:
        # owner-only: derived from patient data; the temporary name ".<key>.npz.*.tmp" is what
        # remove_stale_temp_files clears after a crash
        with atomic_path(final, 0o600) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, image=sample.image, lung_mask=sample.lung_mask, meta=np.array(meta_json))
    except OSError as exc:
        raise CacheError(f"Unable to write cached sample {final} as {exc.strerror or exc}") from exc
    log.debug("wrote cached sample %s", final.name)
    return final


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    hint = "delete it and re-run `lungmae site prepare`"
    if not path.is_file():
        raise CacheError(f"Unable to read cached sample {path} as it does not exist; re-run `lungmae site prepare`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"image", "lung_mask", "meta"} - set(npz.files)
            if missing:
                raise CacheError(f"Unable to read cached sample {path} as it lacks {', '.join(sorted(missing))}; "
                                 f"{hint}")
            image = npz["image"]
            mask = npz["lung_mask"]
            meta_json = str(npz["meta"])
    except CacheError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CacheError(f"Unable to read cached sample {path} as it is truncated or corrupt ({exc}); {hint}") from exc
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as exc:
        raise CacheError(f"Unable to read cached sample {path} as its meta is not valid JSON; {hint}") from exc
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"Unable to read cached sample {path} as its format is "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}, expected {CACHE_FORMAT}; {hint}")
    return image, mask, meta


def read_sample(path: str | os.PathLike[str]) -> Sample:
    """Read a cached sample, checking that it is complete and well-formed.

    Raises:
        CacheError: naming the file when it is missing, truncated, corrupt or of the wrong shape/dtype.
    """
    path = Path(path)
    image, mask, meta = _load(path)
    sample = Sample(image=image, lung_mask=mask, qc=dict(meta.get("qc", {})))
    _check_sample(sample, f"Unable to use cached sample {path}")
    return sample


def read_sample_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta`` mapping stored beside a sample by :func:`write_sample`."""
    return dict(_load(Path(path))[2].get("meta", {}))


def remove_stale_temp_files(cache_dir: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a crashed writer (only ``.<key>.*.tmp`` in ``samples/``); returns the count."""
    folder = Path(cache_dir) / SAMPLES_DIR
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    return removed
