"""Experiment phantoms: four ILD-like classes with the same lung-HU histogram that differ in WHERE and HOW.

The basic phantoms (:mod:`lungmae_core.synthetic.phantoms`) can be told apart by the global lung-HU histogram alone
(a 14-bin histogram and logistic regression reach 0.71-0.88 balanced accuracy), so they cannot show what an
image model adds. Here every scan spends the same "density budget": a fraction ``f_dense`` of its lung voxels
is raised by one increment over the subject's parenchyma (reticulation, ground glass or cyst walls all
reach the same HU, a per-subject increment) and a fraction ``f_low`` falls to cyst-lumen / air-trapping HU.
Fractions and increment are drawn the same way for every class, so the classes share one histogram
distribution. They differ in:

===  ========================  ==============================  ==========================================
idx  name                      where (zone gradient)           how (texture of the dense / low voxels)
===  ========================  ==============================  ==========================================
0    ``basal-reticular``       bases, subpleural               reticulation: walls of small polyhedral cells;
                                                               low voxels: diffuse air-trapping lobules
1    ``basal-ggo``             bases                           patchy ground glass: smooth blobs;
                                                               low voxels: diffuse air-trapping lobules
2    ``apical-cystic``         apices                          cyst clusters: larger cells, walls dense,
                                                               lumens at cyst HU, in the same zone
3    ``peripheral-reticular``  periphery at every height       reticulation as class 0
===  ========================  ==============================  ==========================================

Zone alone confuses 0 and 1; texture alone confuses 0 and 3: a classifier needs both. Textures are drawn at
the scanner's native resolution, at scales of 3-14 mm that survive the 64^3 cube (about 4-5 mm voxels), then
the scanner blurs, adds noise and shifts HU as in the basic phantoms. The blobs and cell walls have about the
same surface-to-volume ratio, so partial-volume averaging in the cube resize changes their histograms alike.
``docs/data.md`` lists the features that separate the classes; ``lungmae_core.experiment.baselines`` holds
the two baselines that check it (global histogram near chance, zone/texture features high).

Scanners: the training sites use :func:`~lungmae_core.synthetic.scanners.scanner_for_site`; :data:`HELDOUT_SCANNER`
(a sharp-kernel, thin-slice, low-dose profile with its own calibration) appears only in the test set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from lungmae_core.errors import ConfigError
from lungmae_core.synthetic.anatomy import Grid, add_vessels_and_airways, draw_chest, lung_box, smooth_noise
from lungmae_core.synthetic.phantoms import Phantom
from lungmae_core.synthetic.scanners import ScannerProfile, blur, checked_acquisition, noise_and_calibration

__all__ = ["EXPERIMENT_CLASSES", "HELDOUT_SCANNER", "generate_experiment_phantom", "DENSE_INCREMENT_HU",
           "LOW_HU"]

log = logging.getLogger(__name__)

EXPERIMENT_CLASSES: tuple[str, ...] = ("basal-reticular", "basal-ggo", "apical-cystic", "peripheral-reticular")

#: Dense voxels sit this far above the subject's parenchyma HU, times a per-subject U(0.75, 1.25).
DENSE_INCREMENT_HU = 300.0
#: Cyst lumens and air-trapping lobules.
LOW_HU = -975.0

#: A scanner no training site has: sharp kernel, thin slices, low dose (noisy), its own HU calibration.
HELDOUT_SCANNER = ScannerProfile(
    name="heldout-sharp-lowdose", manufacturer="Canon Synth", model="Aquilion Heldout", pixel_spacing_mm=2.0,
    slice_thickness_mm=1.5, slice_spacing_mm=2.5, matrix=184, n_slices=116, noise_hu=50.0, blur_mm=0.35,
    hu_offset=-22.0, patient_position="HFS", kvp=100.0)

_ZONE_OF = ("basal-peripheral", "basal", "apical", "peripheral")
_TEXTURE_OF = ("reticular", "ggo", "cystic", "reticular")


def _zone(kind: str, tz: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Zone weight in [0, 1] from relative height ``tz`` (0 base, 1 apex) and radial position ``r``."""
    basal: np.ndarray = np.clip((0.6 - tz) / 0.45, 0.0, 1.0)
    apical: np.ndarray = np.clip((tz - 0.4) / 0.45, 0.0, 1.0)
    peripheral: np.ndarray = np.clip((r - 0.55) / 0.35, 0.0, 1.0)
    weight: np.ndarray
    if kind == "basal-peripheral":
        weight = basal * (0.35 + 0.65 * peripheral)
    elif kind == "basal":
        weight = basal * np.ones_like(r)
    elif kind == "apical":
        weight = apical * np.ones_like(r)
    else:
        weight = peripheral * np.ones_like(tz)
    return weight


def _cells(rng: np.random.Generator, points_mm: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray,
           cell_mm: float) -> np.ndarray:
    """Distance (mm) of each point to the wall of its Voronoi cell (seeds about ``cell_mm`` apart).

    ``(d2 - d1) / 2`` for the nearest and second-nearest seed: 0 on a wall, about ``cell_mm / 2`` at a centre.
    """
    volume = float(np.prod(hi_mm - lo_mm))
    n_seeds = max(8, int(volume / cell_mm ** 3))
    seeds = rng.uniform(lo_mm - cell_mm, hi_mm + cell_mm, size=(n_seeds, 3))
    dist: np.ndarray  # scipy is untyped here: query gives (distances (N, k), indices)
    dist, _ = cKDTree(seeds).query(points_mm, k=2)
    walls: np.ndarray = (dist[:, 1] - dist[:, 0]) / 2.0
    return walls


def _top(score: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` highest scores (ties broken by index)."""
    out = np.zeros(score.shape, bool)
    if count > 0:
        out[np.argpartition(-score, min(count, score.size) - 1)[:count]] = True
    return out


def _add_pattern(index: int, severity: float, hu: np.ndarray, reference: np.ndarray, lung: np.ndarray,
                 rho: np.ndarray, t: np.ndarray, grid: Grid, parenchyma_hu: float, rng: np.random.Generator,
                 ) -> tuple[float, float]:
    """Draw class ``index``'s pattern into ``hu`` (in place) and the same amounts, at random places, into
    ``reference`` (a copy of ``hu``: its lung histogram is the one every class gets); returns the fractions."""
    box = lung_box(lung)
    in_lung = lung[box] > 0
    idx = np.nonzero(in_lung)
    n = idx[0].size
    tz = np.asarray(t[box[0]], np.float32)[idx[0]]
    r = rho[box].astype(np.float32)[idx]
    zone = _zone(_ZONE_OF[index], tz, r)
    patchy = smooth_noise(rng, grid, 18.0, box)[idx]
    zone = zone * np.clip(0.75 + 0.25 * patchy, 0.0, None)
    # Extent follows severity; how dense the abnormal lung is and how much air trapping or cyst lumen a
    # subject has vary independently, with the same law for every class (the histogram stays uninformative).
    f_dense = 0.07 + 0.13 * severity
    f_low = float(rng.uniform(0.015, 0.06))
    increment = float(rng.uniform(0.75, 1.25)) * DENSE_INCREMENT_HU
    texture = _TEXTURE_OF[index]
    spacing = np.asarray(grid.spacing, np.float64)
    points = np.stack(idx, axis=1).astype(np.float64) * spacing
    lo, hi = points.min(axis=0), points.max(axis=0)
    jitter = 0.02 * rng.standard_normal(n)
    if texture == "reticular":
        wall = _cells(rng, points, lo, hi, cell_mm=10.0) < 2.0
        dense = _top(wall * (1.0 + zone) + jitter, int(f_dense * n))
    elif texture == "ggo":
        blobs = smooth_noise(rng, grid, 4.0, box)[idx] > 0.35
        dense = _top(blobs * (1.0 + zone) + jitter, int(f_dense * n))
    else:  # cystic: walls and lumens of the same cells, in the same zone
        d_wall = _cells(rng, points, lo, hi, cell_mm=13.0)
        dense = _top((d_wall < 1.6) * (1.0 + zone) + jitter, int(f_dense * n))
    if texture == "cystic":
        low = _top((d_wall > 2.8) * (1.0 + zone) * ~dense + jitter, int(f_low * n))
    else:  # air-trapping lobules scattered through the lungs, independent of the zone
        lobules = smooth_noise(rng, grid, 4.0, box)[idx]
        low = _top(np.where(dense, -10.0, lobules) + jitter, int(f_low * n))
    for target, (d_mask, l_mask) in ((hu, (dense, low)), (reference, _shuffled(rng, dense, low))):
        h = target[box]
        values = h[idx]
        values[d_mask] = parenchyma_hu + increment
        values[l_mask] = LOW_HU
        h[idx] = values
        target[box] = h
    return float(dense.mean()), float(low.mean())


def _shuffled(rng: np.random.Generator, dense: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As many dense and low voxels as given, at uniformly random lung positions (no zone, no texture)."""
    order = rng.permutation(dense.size)
    n_dense, n_low = int(dense.sum()), int(low.sum())
    d, lo = np.zeros(dense.size, bool), np.zeros(dense.size, bool)
    d[order[:n_dense]] = True
    lo[order[n_dense:n_dense + n_low]] = True
    return d, lo


def generate_experiment_phantom(class_index: int, *, seed: int, scanner: ScannerProfile | None = None,
                                severity: float | None = None, shape: Sequence[int] | None = None) -> Phantom:
    """One experiment phantom of class ``EXPERIMENT_CLASSES[class_index]``; same arguments, same phantom.

    Args:
        class_index: 0..3, see the module table.
        seed: subject seed (anatomy, inspiration, severity, pattern, noise).
        scanner: acquisition profile; defaults to ``scanner_for_site(0)``.
        severity: in [0, 1]; ``None`` draws Uniform(0.2, 1) from ``seed`` (the same law for every class).
        shape: ``(D, H, W)``; defaults to the scanner's own (its native resolution).

    Returns:
        A :class:`~lungmae_core.synthetic.phantoms.Phantom` whose ``label`` is the class name.

    Raises:
        ConfigError: for a class index outside 0..3, a severity outside [0, 1] or a too small shape.
    """
    if not 0 <= class_index < len(EXPERIMENT_CLASSES):
        raise ConfigError(f"experiment phantom class must be in 0..{len(EXPERIMENT_CLASSES) - 1}; got {class_index}")
    scanner, shape_t = checked_acquisition("experiment phantom", severity, scanner, shape)
    anatomy_rng = np.random.default_rng([int(seed), 10])
    pattern_rng = np.random.default_rng([int(seed), 11, class_index])
    sev = float(pattern_rng.uniform(0.2, 1.0)) if severity is None else float(severity)
    # "normal" anatomy: no volume loss or hyperinflation, so lung size says nothing about the class.
    subj, grid, hu, lung, rho, t = draw_chest(anatomy_rng, scanner.extent_mm, shape_t, "normal", 0.0)
    spacing = grid.spacing
    reference = hu.copy()
    f_dense, f_low = _add_pattern(class_index, sev, hu, reference, lung, rho, t, grid, subj.parenchyma_hu,
                                  pattern_rng)
    del rho
    in_lung = add_vessels_and_airways(subj, grid, lung, anatomy_rng, hu, reference)
    # Where the pattern goes changes which parenchyma it replaces (the posterior lung is denser), and the
    # kernel and slice blur change a thin wall's histogram more than a blob's. Giving the blurred lung the
    # lung-HU distribution of the same amounts placed at random (rank for rank, so the blurred image keeps
    # its spatial order) makes the classes' histograms alike at native resolution, before the noise.
    before = np.sort(reference[in_lung])
    del reference
    blur(hu, scanner, spacing)
    after = hu[in_lung]
    after[np.argsort(after, kind="stable")] = before
    hu[in_lung] = after
    # Subjects differ in lung density beyond inspiration (age, perfusion, body habitus): a lung-wide shift.
    hu[in_lung] += np.float32(anatomy_rng.normal(0.0, 25.0))
    noise_and_calibration(hu, scanner, np.random.default_rng([int(seed), 12]))
    log.debug("experiment phantom %s (severity %.2f, dense %.3f, low %.3f) on %s", EXPERIMENT_CLASSES[class_index],
              sev, f_dense, f_low, scanner.name)
    return Phantom(hu=hu, spacing_mm=spacing, lung_mask=in_lung.astype(np.uint8), label=EXPERIMENT_CLASSES[class_index],
                   severity=sev, subject_seed=int(seed), scanner=scanner, inspiration=subj.inspiration)
