"""The experiment's sites: labelled hospitals, unlabelled (pretraining-only) hospitals and a pooled test set.

Built-in mode draws experiment phantoms (:mod:`lungmae_core.synthetic.experiment_phantoms`): every labelled
site ``i`` scans with ``scanner_for_site(i)`` and holds ``k_max`` training patients per class (labels are
revealed ``k`` per class by :func:`labelled_subset`) plus ``test_per_class`` test patients per class;
unlabelled sites (scanners ``n_labelled + j``) hold ``unlabelled_per_site`` scans of random class whose
labels are never read; the held-out scanner adds ``heldout_per_class`` test patients per class that no
site trains on. Preprocessed cubes are cached as ``.npz`` files keyed by every argument that shapes them, so
a rerun (another profile, more seeds) only reads them.

Cache mode (``--site``) reads prepared site caches instead: scans with a label are split by patient into
train and test (``test_fraction``, stratified), scans without one pretrain only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungmae_core.atomic import atomic_path
from lungmae_core.errors import DatasetError

__all__ = ["SiteData", "ExperimentData", "PhantomPlan", "build_phantom_sites", "load_cache_sites",
           "labelled_subset"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SiteData:
    """One hospital: cubes ``(N, 1, S, S, S)`` float32, masks uint8, labels (-1: unlabelled), patient ids."""

    name: str
    scanner: str
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    labelled: bool

    def __len__(self) -> int:
        return int(len(self.labels))


@dataclasses.dataclass
class ExperimentData:
    """Training sites (labelled first) and the pooled test set (with the scanner of each test patient)."""

    sites: list[SiteData]
    test_images: np.ndarray
    test_masks: np.ndarray
    test_labels: np.ndarray
    test_scanner: list[str]
    class_names: tuple[str, ...]
    source: str

    @property
    def labelled_sites(self) -> list[SiteData]:
        return [s for s in self.sites if s.labelled]


@dataclasses.dataclass(frozen=True)
class PhantomPlan:
    """How many experiment phantoms of what, at which cube size (one profile's data)."""

    labelled_sites: int = 3
    unlabelled_sites: int = 2
    k_max: int = 32
    test_per_class: int = 6
    heldout_per_class: int = 8
    unlabelled_per_site: int = 48
    size: int = 48
    shape_scale: float = 0.6
    data_seed: int = 0


#: One phantom to draw: (class index, seed, scanner index (-1: held out), cube size, shape scale).
_Job = tuple[int, int, int, int, float]


def _job(args: _Job) -> tuple[np.ndarray, np.ndarray]:
    """Generate and preprocess one phantom (runs in a worker process)."""
    class_index, seed, scanner_index, size, shape_scale = args
    from lungmae_core.config import PreprocessConfig
    from lungmae_core.preprocess import preprocess_volume
    from lungmae_core.synthetic.experiment_phantoms import HELDOUT_SCANNER, generate_experiment_phantom
    from lungmae_core.synthetic.scanners import scanner_for_site

    scanner = HELDOUT_SCANNER if scanner_index < 0 else scanner_for_site(scanner_index)
    shape = tuple(max(24, round(n * shape_scale)) for n in scanner.shape)
    phantom = generate_experiment_phantom(class_index, seed=seed, scanner=scanner, shape=shape)
    sample = preprocess_volume(phantom.to_volume(), PreprocessConfig(size=size))
    return sample.image.astype(np.float32), sample.lung_mask.astype(np.uint8)


def _generate(jobs: list[_Job], cache_dir: Path, workers: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cubes for ``jobs``, read from ``cache_dir`` or generated (in ``workers`` processes) and cached."""
    from lungmae_core.config import PreprocessConfig
    from lungmae_core.synthetic import anatomy, experiment_phantoms, phantoms, scanners, source_digest

    # The generator is experiment_phantoms and what it draws with (anatomy, scanners, phantoms' Phantom).
    source = source_digest(experiment_phantoms, anatomy, scanners, phantoms) + PreprocessConfig().fingerprint()
    version = hashlib.sha256(source.encode()).hexdigest()[:12]
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / (hashlib.sha256(json.dumps([version, *job]).encode()).hexdigest()[:24] + ".npz")
             for job in jobs]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        logger.info("generating %d of %d experiment phantoms (%d cached) with %d worker(s)", len(todo), len(jobs),
                    len(jobs) - len(todo), workers)
        bar = tqdm(total=len(todo), desc="phantoms", unit="scan", disable=not progress)

        def store(i: int, result: tuple[np.ndarray, np.ndarray]) -> None:
            with atomic_path(paths[i], fsync=False) as tmp, open(tmp, "wb") as f:
                np.savez(f, image=result[0], lung_mask=result[1])
            bar.update(1)

        if workers <= 1:
            for i in todo:
                store(i, _job(jobs[i]))
        else:
            ctx = multiprocessing.get_context("spawn")  # the parent runs torch threads a fork must not inherit
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for i, result in zip(todo, pool.map(_job, [jobs[i] for i in todo]), strict=False):
                    store(i, result)
        bar.close()
    images, masks = [], []
    for p in paths:
        with np.load(p) as z:
            images.append(z["image"])
            masks.append(z["lung_mask"])
    return np.stack(images), np.stack(masks)


def build_phantom_sites(plan: PhantomPlan, cache_dir: str | os.PathLike[str], *, workers: int = 2,
                        progress: bool = False) -> ExperimentData:
    """Draw (or read from the cache) every site's phantoms and the pooled test set of ``plan``."""
    from lungmae_core.synthetic.experiment_phantoms import EXPERIMENT_CLASSES, HELDOUT_SCANNER
    from lungmae_core.synthetic.scanners import scanner_for_site

    n_classes = len(EXPERIMENT_CLASSES)
    base = 1_000_000 * (plan.data_seed + 1)
    jobs: list[_Job] = []
    owners: list[tuple[str, int]] = []  # (part, label) per job
    for i in range(plan.labelled_sites):
        for c in range(n_classes):
            for j in range(plan.k_max):
                jobs.append((c, base + i * 10_000 + c * 1_000 + j, i, plan.size, plan.shape_scale))
                owners.append((f"train{i}", c))
            for j in range(plan.test_per_class):
                jobs.append((c, base + i * 10_000 + c * 1_000 + 500 + j, i, plan.size, plan.shape_scale))
                owners.append(("test", c))
    rng = np.random.default_rng(plan.data_seed)
    for u in range(plan.unlabelled_sites):
        index = plan.labelled_sites + u
        for j in range(plan.unlabelled_per_site):
            c = int(rng.integers(n_classes))
            jobs.append((c, base + index * 10_000 + 9_000 + j, index, plan.size, plan.shape_scale))
            owners.append((f"unlabelled{index}", -1))
    for c in range(n_classes):
        for j in range(plan.heldout_per_class):
            jobs.append((c, base + 900_000 + c * 1_000 + j, -1, plan.size, plan.shape_scale))
            owners.append(("heldout", c))
    images, masks = _generate(jobs, Path(cache_dir), workers, progress)
    owner_part = np.array([o[0] for o in owners])
    owner_label = np.array([o[1] for o in owners])
    sites = []
    for i in range(plan.labelled_sites):
        sel = owner_part == f"train{i}"
        sites.append(SiteData(f"site{i}", scanner_for_site(i).name, images[sel], masks[sel], owner_label[sel], True))
    for u in range(plan.unlabelled_sites):
        index = plan.labelled_sites + u
        sel = owner_part == f"unlabelled{index}"
        sites.append(SiteData(f"site{index}", scanner_for_site(index).name, images[sel], masks[sel],
                              np.full(int(sel.sum()), -1), False))
    test_sel = np.isin(owner_part, ["test", "heldout"])
    scanner_names = [scanner_for_site(i).name for i in range(plan.labelled_sites) for _ in range(n_classes)
                     for _ in range(plan.test_per_class)]
    test_scanner = scanner_names + [HELDOUT_SCANNER.name] * (n_classes * plan.heldout_per_class)
    return ExperimentData(sites, images[test_sel], masks[test_sel], owner_label[test_sel], test_scanner,
                          EXPERIMENT_CLASSES, "experiment-phantoms")


def load_cache_sites(caches: Sequence[tuple[str, str | os.PathLike[str]]], *, size: int, test_fraction: float = 0.3,
                     seed: int = 0, class_names: Sequence[str] | None = None) -> ExperimentData:
    """Sites from prepared caches ``[(name, cache_dir), ...]``: labelled scans split train/test by patient.

    Raises:
        DatasetError: when no site has labelled scans or a class is missing from the pooled test set.
    """
    from lungmae_core.data import CLASS_NAMES, CachedVolumes

    names = tuple(class_names or CLASS_NAMES)
    rng = np.random.default_rng(seed)
    sites, test_i, test_m, test_y, test_s = [], [], [], [], []
    for name, cache in caches:
        ds = CachedVolumes(cache, size=size, class_names=names)
        images, masks = ds._images.numpy(), ds._masks.numpy()  # noqa: SLF001 - the experiment reads all at once
        labels = np.asarray(ds.labels)
        patients = np.asarray(ds.patient_ids)
        test = np.zeros(len(labels), bool)
        for c in range(len(names)):
            members = np.unique(patients[labels == c])
            chosen = rng.permutation(members)[: int(round(test_fraction * len(members)))]
            test |= np.isin(patients, chosen) & (labels >= 0)
        test_i.append(images[test])
        test_m.append(masks[test])
        test_y.append(labels[test])
        test_s += [name] * int(test.sum())
        keep = ~test
        sites.append(SiteData(name, name, images[keep], masks[keep], labels[keep], bool((labels[keep] >= 0).any())))
    if not any(s.labelled for s in sites):
        raise DatasetError("Unable to run the experiment as none of the sites' caches holds a labelled scan")
    ty = np.concatenate(test_y)
    missing = [names[c] for c in range(len(names)) if not (ty == c).any()]
    if missing:
        raise DatasetError(f"Unable to run the experiment as the pooled test set has no scan of class(es) "
                           f"{', '.join(missing)}; label more scans or lower the class count")
    sites.sort(key=lambda s: not s.labelled)
    return ExperimentData(sites, np.concatenate(test_i), np.concatenate(test_m), ty, test_s, names, "site-caches")


def labelled_subset(site: SiteData, k: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of ``k`` labelled scans per class of ``site`` (fewer where the site has fewer).

    The order is a seeded permutation per class, so the subsets are nested: the k=4 scans are among the
    k=8 ones, and arms compared at one k see the same labelled scans.
    """
    rng = np.random.default_rng([seed, 7])
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(site.labels == c)
        chosen.extend(rng.permutation(members)[:k].tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)
