"""Datasets of preprocessed volumes for training: a site's cache, or samples already in memory, and splits.

Both datasets yield the same items, ``{"image": (1, S, S, S) float32 in [0, 1], "lung_mask": (1, S, S, S)
float32 0/1, "label": int}`` (``-1`` = unlabelled), and expose ``.labels`` (``np.int64``) and
``.patient_ids``. A site's cache is small (hundreds of 128^3 cubes at most), so it is loaded into memory
once; the mask is kept as uint8 until an item is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lungmae_core.cache import read_sample
from lungmae_core.contract import DEFAULT_CLASSES
from lungmae_core.errors import CacheError, ConfigError, DatasetError
from lungmae_core.manifest import MANIFEST_NAME, SPLITS, read_manifest
from lungmae_core.preprocess import Sample

__all__ = ["CLASS_NAMES", "CachedVolumes", "InMemoryVolumes", "assign_splits", "resize_cube"]

log = logging.getLogger(__name__)

#: The default class list, defined once with the wire contract (the federation's class list travels in it).
CLASS_NAMES: tuple[str, ...] = DEFAULT_CLASSES


def resize_cube(image: np.ndarray, lung_mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a sample to ``size``^3: image trilinear (corners aligned, as preprocessing), mask re-thresholded.

    Args:
        image: ``(1, S, S, S)`` float32.
        lung_mask: ``(1, S, S, S)`` uint8.
        size: output side.

    Returns:
        ``(image (1, size, size, size) float32, lung_mask (1, size, size, size) uint8)``.
    """
    if image.shape[-1] == size:
        return image, lung_mask
    both = torch.from_numpy(np.stack([image[0], lung_mask[0].astype(np.float32)]))[None]  # (1, 2, S, S, S)
    out = torch.nn.functional.interpolate(both, size=(size,) * 3, mode="trilinear", align_corners=True)[0]
    return out[:1].numpy().astype(np.float32), (out[1:] >= 0.5).numpy().astype(np.uint8)


class _VolumeDataset(Dataset[dict[str, Any]]):
    """Shared storage and item access: images ``(N, 1, S, S, S)`` float32, masks uint8, labels int64."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, patient_ids: Sequence[str]):
        assert images.shape == masks.shape and images.ndim == 5 and images.shape[1] == 1
        assert len(labels) == len(images) == len(patient_ids)
        self._images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self._masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.patient_ids = list(patient_ids)

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A copy: in-place augmentation of an item must not change the dataset held in memory.
        return {"image": self._images[index].clone(), "lung_mask": self._masks[index].float(),
                "label": int(self.labels[index])}

    @property
    def size(self) -> int:
        """Side of the cubes."""
        return int(self._images.shape[-1])


class InMemoryVolumes(_VolumeDataset):
    """Samples already in memory (phantoms, tests, demos) as a dataset.

    Args:
        samples: :class:`~lungmae_core.preprocess.Sample` objects or ``(image, lung_mask)`` pairs, each
            ``(1, S, S, S)`` (the same S for all).
        labels: one int per sample (``-1`` unlabelled); ``None`` means all unlabelled.
        patient_ids: one id per sample; defaults to ``"mem-0000"``, ``"mem-0001"``, ...

    Raises:
        DatasetError: no samples, lengths that differ, or shapes that are not ``(1, S, S, S)`` alike.

    Examples:
        >>> from lungmae_core.synthetic.phantoms import generate_phantom
        >>> from lungmae_core.config import PreprocessConfig
        >>> from lungmae_core.preprocess import preprocess_volume
        >>> s = preprocess_volume(generate_phantom("ggo", seed=0).to_volume(), PreprocessConfig(size=32))
        >>> ds = InMemoryVolumes([s], labels=[1])
        >>> ds[0]["image"].shape, ds.labels
        (torch.Size([1, 32, 32, 32]), array([1]))
    """

    def __init__(self, samples: Sequence[Sample | tuple[np.ndarray, np.ndarray]], labels: Sequence[int] | None = None,
                 patient_ids: Sequence[str] | None = None):
        if len(samples) == 0:
            raise DatasetError("InMemoryVolumes needs at least one sample; got none")
        pairs = [(s.image, s.lung_mask) if isinstance(s, Sample) else tuple(s) for s in samples]
        labels_arr = np.full(len(pairs), -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if labels_arr.shape != (len(pairs),):
            raise DatasetError(f"InMemoryVolumes got {len(pairs)} samples but {labels_arr.size} labels")
        ids = [f"mem-{i:04d}" for i in range(len(pairs))] if patient_ids is None else list(patient_ids)
        if len(ids) != len(pairs):
            raise DatasetError(f"InMemoryVolumes got {len(pairs)} samples but {len(ids)} patient ids")
        shape = np.shape(pairs[0][0])
        for i, (image, mask) in enumerate(pairs):
            if np.ndim(image) != 4 or np.shape(image)[0] != 1 or len(set(np.shape(image)[1:])) != 1:
                raise DatasetError(f"InMemoryVolumes sample {i}: image must have shape (1, S, S, S); "
                                   f"got {np.shape(image)}")
            if np.shape(image) != shape or np.shape(mask) != shape:
                raise DatasetError(f"InMemoryVolumes sample {i}: image {np.shape(image)} and mask {np.shape(mask)} "
                                   f"must both match sample 0's shape {shape}")
        super().__init__(np.stack([p[0] for p in pairs]).astype(np.float32, copy=False),
                         (np.stack([p[1] for p in pairs]) > 0).astype(np.uint8), labels_arr, ids)


class CachedVolumes(_VolumeDataset):
    """The accepted samples of a site's cache (``<cache>/manifest.csv`` + ``<cache>/samples/*.npz``).

    Args:
        cache_dir: the cache written by ``lungmae site prepare``.
        size: cube side to serve; cached cubes of another size are resized (image trilinear, mask
            re-thresholded at 0.5). ``None`` keeps the size of the first sample.
        splits: keep only rows whose ``split`` is one of these (``"train"``, ``"val"``, ``"test"``, or a
            single string); ``None`` keeps all.
        labelled_only: keep only rows with a label.
        class_names: label names in index order. Defaults to :data:`CLASS_NAMES`.
        progress: show a progress bar while loading.

    Raises:
        CacheError: naming the directory when it is missing, has no manifest, or no accepted sample
            passes the filters; naming the file when a sample is unreadable.
        DatasetError: a label in the manifest that is not one of ``class_names``.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, size: int | None = None,
                 splits: str | Iterable[str] | None = None, labelled_only: bool = False,
                 class_names: Sequence[str] = CLASS_NAMES, progress: bool = False):
        self.cache_dir = Path(cache_dir)
        if not self.cache_dir.is_dir():
            raise CacheError(f"Unable to load the cache {self.cache_dir} as it does not exist; "
                             "run `lungmae site prepare` first")
        if not (self.cache_dir / MANIFEST_NAME).is_file():
            raise CacheError(f"Unable to load the cache {self.cache_dir} as it has no {MANIFEST_NAME}; "
                             "run `lungmae site prepare` first")
        split_set = None if splits is None else ({splits} if isinstance(splits, str) else set(splits))
        if split_set is not None and not split_set <= set(SPLITS):
            raise ConfigError(f"splits must be among {', '.join(SPLITS)}; got {sorted(split_set)}")
        if size is not None and not 8 <= int(size) <= 1024:
            raise ConfigError(f"size must be in [8, 1024]; got {size}")
        rows = [r for r in read_manifest(self.cache_dir) if r.accepted]
        n_accepted = len(rows)
        if split_set is not None:
            rows = [r for r in rows if r.split in split_set]
        if labelled_only:
            rows = [r for r in rows if r.label]
        if not rows:
            filters = []
            if split_set is not None:
                filters.append(f"split in {sorted(split_set)}")
            if labelled_only:
                filters.append("labelled")
            detail = f" ({n_accepted} accepted before filtering by {' and '.join(filters)})" if filters else ""
            raise CacheError(f"Unable to load the cache {self.cache_dir} as it has no accepted sample{detail}")
        index = {name: i for i, name in enumerate(class_names)}
        labels = []
        for r in rows:
            if r.label and r.label not in index:
                raise DatasetError(f"{self.cache_dir / MANIFEST_NAME}: series {r.series_id} has label {r.label!r}, "
                                   f"not one of {', '.join(class_names)}")
            labels.append(index[r.label] if r.label else -1)
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        from tqdm.auto import tqdm

        for r in tqdm(rows, desc="loading cache", unit="scan", disable=not progress):
            sample = read_sample(self.cache_dir / r.cache_file)
            target = int(size) if size is not None else (images[0].shape[-1] if images else sample.image.shape[-1])
            image, mask = resize_cube(sample.image, sample.lung_mask, target)
            images.append(image)
            masks.append(mask)
        # Serve the samples in an order set by their voxels, not by the manifest's (sorted by pseudonym, which
        # a new site secret changes): the same data and seed then give the same batches, and the same model,
        # wherever and however often the cache was prepared.
        order = sorted(range(len(rows)), key=lambda i: (hashlib.sha256(images[i].tobytes()).hexdigest(),
                                                        rows[i].series_id))
        rows = [rows[i] for i in order]
        self.rows = rows
        self.series_ids = [r.series_id for r in rows]
        super().__init__(np.stack([images[i] for i in order]), np.stack([masks[i] for i in order]),
                         np.asarray([labels[i] for i in order], np.int64), [r.patient_id for r in rows])
        log.info("loaded %d samples (%d^3) from the cache", len(rows), self.size)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1; "
                          f"got {tuple(fractions)}")
    return f


def _allocate(n: int, f: np.ndarray, tie_offset: int) -> np.ndarray:
    """Largest-remainder counts of ``n`` items over the splits; ties rotate with ``tie_offset``."""
    exact = f * n
    counts: np.ndarray = np.floor(exact).astype(int)
    rest = exact - counts
    order = sorted(range(3), key=lambda k: (-round(rest[k], 9), (k - tie_offset) % 3))
    for k in order[: n - counts.sum()]:
        counts[k] += 1
    return counts


def assign_splits(patient_ids: Iterable[str], seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                  labels: Mapping[str, int | str | None] | Sequence[int | str | None] | None = None,
                  ) -> dict[str, str]:
    """Assign every patient to ``train``/``val``/``test``, deterministically and by patient.

    All series of a patient share its split. With ``labels``, each class is split in the given proportions
    (stratified); rounding remainders rotate between splits across classes, and if a split with a positive
    fraction would be empty while there are enough patients, one patient is moved into it.

    Args:
        patient_ids: pseudonymous ids (repeats allowed: one per series).
        seed: the same seed and ids always give the same assignment, whatever their order.
        fractions: ``(train, val, test)``, non-negative, summing to 1. Defaults to ``(0.6, 0.2, 0.2)``.
        labels: optional label per patient: a mapping ``patient -> label``, or a sequence aligned with
            ``patient_ids``; ``None``/``-1``/``""`` means unlabelled (its own stratum).

    Returns:
        ``{patient_id: split}``.

    Raises:
        ConfigError: bad fractions, labels of the wrong length, or one patient with two labels.

    Examples:
        >>> s = assign_splits([f"p{i}" for i in range(10)], seed=1)
        >>> sorted(s.values()).count("train"), sorted(s.values()).count("val")
        (6, 2)
    """
    f = _check_fractions(fractions)
    ids = list(patient_ids)
    per_patient: dict[str, Any] = {}
    if labels is not None:
        items: Iterable[tuple[str, int | str | None]]
        if isinstance(labels, Mapping):
            items = labels.items()
        else:
            label_list = list(labels)
            if len(label_list) != len(ids):
                raise ConfigError(f"assign_splits got {len(ids)} patient ids but {len(label_list)} labels")
            items = zip(ids, label_list, strict=True)
        for pid, lab in items:
            lab = None if lab in (None, -1, "") else lab
            if pid in per_patient and per_patient[pid] != lab:
                raise ConfigError(f"assign_splits: patient {pid} has two labels ({per_patient[pid]!r} and {lab!r})")
            per_patient[pid] = lab
    unique = sorted(set(ids))
    strata: dict[str, list[str]] = defaultdict(list)
    for pid in unique:
        strata[repr(per_patient.get(pid))].append(pid)
    rng = np.random.default_rng(seed)
    result: dict[str, str] = {}
    groups: dict[str, list[list[str]]] = {}
    for offset, key in enumerate(sorted(strata)):
        members = strata[key]
        perm = [members[i] for i in rng.permutation(len(members))]
        counts = _allocate(len(perm), f, offset)
        bounds = np.cumsum(counts)
        groups[key] = [perm[:bounds[0]], perm[bounds[0]:bounds[1]], perm[bounds[1]:]]
    # Give every split with a positive fraction at least one patient when there are enough patients.
    totals = [sum(len(g[k]) for g in groups.values()) for k in range(3)]
    for k in range(3):
        if f[k] > 0 and totals[k] == 0 and len(unique) >= int(np.sum(f > 0)):
            donor = int(np.argmax(totals))
            key = max(groups, key=lambda g: (len(groups[g][donor]), g))
            groups[key][k].append(groups[key][donor].pop())
            totals[donor] -= 1
            totals[k] += 1
    for parts in groups.values():
        for split, members in zip(SPLITS, parts, strict=True):
            for pid in members:
                result[pid] = split
    return result
