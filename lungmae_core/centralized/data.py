"""The data of the centralized baseline: built-in phantoms, generated once and cached in the workdir, and the
split by patient of any dataset (phantoms or a prepared site cache) into pretrain/train/val/test."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lungmae_core.errors import DatasetError, InvalidSeriesError

__all__ = ["PHANTOM_SOURCE_VERSION", "phantom_dataset", "split_by_patient"]

logger = logging.getLogger(__name__)

#: Bump when the way phantoms are drawn here changes, so cached phantoms are regenerated.
PHANTOM_SOURCE_VERSION = 1


def _phantom_job(job: tuple[int, str, int, int, int, str, tuple[int, int, int] | None]) -> tuple[int, str | None]:
    """Generate, preprocess and cache one phantom (runs in a worker process). Returns (index, rejection)."""
    from lungmae_core.cache import write_sample
    from lungmae_core.config import PreprocessConfig
    from lungmae_core.preprocess import preprocess_volume
    from lungmae_core.synthetic.phantoms import generate_phantom
    from lungmae_core.synthetic.scanners import scanner_for_site

    index, label, seed, scanner_index, size, cache_dir, shape = job
    key = _phantom_key(label, seed, scanner_index, size, shape)
    phantom = generate_phantom(label, seed=seed, scanner=scanner_for_site(scanner_index), shape=shape)
    try:
        sample = preprocess_volume(phantom.to_volume(), PreprocessConfig(size=size))
    except InvalidSeriesError as exc:
        return index, str(exc)
    write_sample(cache_dir, key, sample, {"source": "phantom", "label": label, "scanner": scanner_index})
    return index, None


@functools.lru_cache(maxsize=1)
def _generator_fingerprint() -> str:
    """Hash of the phantom generator's source (the phantoms, the anatomy they draw and the scanners that
    acquire them): cached phantoms are redrawn whenever any of it changes."""
    from lungmae_core.synthetic import anatomy, phantoms, scanners, source_digest

    return source_digest(phantoms, anatomy, scanners)[:16]


def _phantom_key(label: str, seed: int, scanner_index: int, size: int, shape: tuple[int, int, int] | None) -> str:
    from lungmae_core.cache import cache_key
    from lungmae_core.config import PreprocessConfig

    source = (f"phantom-v{PHANTOM_SOURCE_VERSION}:{_generator_fingerprint()}:{label}:{seed}:{scanner_index}:"
              f"{shape}")
    return cache_key(source, PreprocessConfig(size=size))


def phantom_dataset(
    scans: int,
    *,
    size: int,
    seed: int = 0,
    cache_dir: str | os.PathLike[str],
    workers: int = 2,
    shape: tuple[int, int, int] | None = None,
    progress: bool = False,
) -> tuple[Any, list[str]]:
    """Built-in data: ``scans`` synthetic chest CTs, balanced over the four classes and four scanners.

    Phantom ``i`` has class ``CLASS_NAMES[i % 4]``, subject seed ``seed * 100_000 + i`` and scanner
    ``scanner_for_site(i // 4 % 4)``, so the pooled data mixes hospitals like a centralized study would.
    Each is preprocessed as a site would (lung mask, crop, cube, HU window) and cached atomically in
    ``cache_dir``; a rerun with the same arguments only reads the cache (keys include a hash of the
    generator's source and the preprocessing fingerprint, so stale phantoms are never reused).

    Args:
        scans: number of phantoms (>= 4: one per class at least).
        size: cube side (the model's ``img_size``).
        seed: selects the subjects.
        cache_dir: where preprocessed phantoms are kept.
        workers: processes generating phantoms in parallel (1: in this process).
        shape: ``(D, H, W)`` of the generated CT; ``None``: the scanner's own (about 100 x 160 x 160). A
            smaller grid over the same field of view is faster (tests).
        progress: tqdm bar.

    Returns:
        ``(InMemoryVolumes, rejections)``; rejections are the preprocessing messages of phantoms whose lungs
        were judged implausible (they are left out).

    Raises:
        DatasetError: for fewer than 4 scans, or when every phantom was rejected.
    """
    from lungmae_core.cache import read_sample, sample_path
    from lungmae_core.data import CLASS_NAMES, InMemoryVolumes

    if scans < len(CLASS_NAMES):
        raise DatasetError(f"Unable to build the phantom dataset as scans must be >= {len(CLASS_NAMES)} "
                           f"(one per class); got {scans}")
    shape_t = None if shape is None else (int(shape[0]), int(shape[1]), int(shape[2]))
    jobs = [(i, CLASS_NAMES[i % 4], seed * 100_000 + i, i // 4 % 4, size, str(cache_dir), shape_t)
            for i in range(scans)]
    todo = [job for job in jobs if not sample_path(cache_dir, _phantom_key(*job[1:5], shape_t)).is_file()]
    rejected: dict[int, str] = {}
    if todo:
        logger.info("generating %d of %d phantoms (%d cached) with %d worker(s)", len(todo), scans,
                    scans - len(todo), workers)
        bar = tqdm(total=len(todo), desc="phantoms", unit="scan", disable=not progress)
        if workers <= 1:
            results = map(_phantom_job, todo)
            for index, reason in results:
                if reason:
                    rejected[index] = reason
                bar.update(1)
        else:
            # spawn: the parent already runs torch threads, which a forked child must not inherit
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
                for index, reason in pool.map(_phantom_job, todo):
                    if reason:
                        rejected[index] = reason
                    bar.update(1)
        bar.close()
    samples, labels, ids = [], [], []
    for index, label, subject_seed, scanner_index, _, _, _ in jobs:
        path = sample_path(cache_dir, _phantom_key(label, subject_seed, scanner_index, size, shape_t))
        if index in rejected or not path.is_file():
            continue
        samples.append(read_sample(path))
        labels.append(CLASS_NAMES.index(label))
        ids.append(f"phantom-{index:05d}")
    if rejected:
        logger.warning("%d phantom(s) rejected by preprocessing, e.g.: %s", len(rejected),
                       next(iter(rejected.values())))
    if not samples:
        raise DatasetError("Unable to build the phantom dataset as preprocessing rejected every phantom")
    return InMemoryVolumes(samples, labels, ids), list(rejected.values())


def _subset(dataset: Any, indices: Sequence[int]) -> Any:
    subset = torch.utils.data.Subset(dataset, list(indices))
    subset.labels = np.asarray(dataset.labels)[list(indices)]  # type: ignore[attr-defined]
    return subset


def split_by_patient(dataset: Any, seed: int, split_names: Sequence[str] | None) -> dict[str, Any]:
    """Split by patient: the cache's own splits when it has them, else a stratified 60/20/20 assignment.

    Returns:
        ``pretrain`` (train + val scans, labels unused) and the labelled scans of ``train``, ``val``, ``test``.

    Raises:
        DatasetError: when a split has no labelled scan.
    """
    from lungmae_core.data import assign_splits

    labels = np.asarray(dataset.labels)
    if split_names is None:
        by_patient = assign_splits(dataset.patient_ids, seed, labels=[int(x) for x in labels])
        split_names = [by_patient[p] for p in dataset.patient_ids]
    out = {}
    for name in ("train", "val", "test"):
        idx = [i for i, s in enumerate(split_names) if s == name]
        out[name] = idx
    labelled = {name: [i for i in idx if labels[i] >= 0] for name, idx in out.items()}
    for name in ("train", "val", "test"):
        if not labelled[name]:
            raise DatasetError(f"Unable to fine-tune as the {name} split has no labelled scan "
                               f"({len(out[name])} scans in it); use more scans or relabel the cache")
    return {"pretrain": _subset(dataset, out["train"] + out["val"]),
            **{name: _subset(dataset, idx) for name, idx in labelled.items()}}
