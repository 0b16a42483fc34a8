"""Synthetic chest CT phantoms in HU: the built-in data behind simulation, demos and tests.

A phantom is a seeded, deterministic chest CT with the anatomy a lung pipeline cares about: body outline with
subcutaneous fat, ribs, sternum and spine, mediastinum, heart and aorta, two lungs with a diaphragm dome,
branching vessels and airways (trachea, main bronchi, bronchial tree), a stomach gas bubble, a patient table
and air around it, then scanner blur and correlated noise. Four classes change the lungs in texture and in
location, not only in their HU histogram:

- ``normal``
- ``ggo``: patchy, hazy ground-glass increase (to about -600..-300 HU), lower and peripheral, vessels still seen
- ``fibrosis``: reticulation and honeycombing (clustered small cysts with walls), basal and subpleural,
  with some volume loss
- ``emphysema``: upper-zone centrilobular low-attenuation areas (< -950 HU) and subpleural bullae,
  with hyperinflation

Each subject varies in body and lung size and shape and in inspiration level (which moves the parenchyma's
HU), and each simulated hospital has a :class:`~lungmae_core.synthetic.scanners.ScannerProfile` (pixel
spacing, slice thickness, matrix, noise, reconstruction blur, HU calibration offset, patient position) so that
sites are non-IID. The anatomy is drawn by :mod:`lungmae_core.synthetic.anatomy`, the scanner's effects by
:mod:`lungmae_core.synthetic.scanners`; this module adds the diseases and puts the steps together.

Arrays are canonical (docs/CONTRACTS.md): ``(D, H, W)`` pointing to ``(+S, +P, +L)``. ``patient_position``
is a fact for the DICOM writer (a feet-first series is written in the order and orientation such a scanner
would produce); the phantom itself is always returned canonical.

Examples:
    >>> from lungmae_core.synthetic.scanners import scanner_for_site
    >>> p = generate_phantom("fibrosis", seed=3, scanner=scanner_for_site(0))
    >>> p.hu.shape, p.hu.dtype, p.lung_mask.dtype
    ((100, 160, 160), dtype('float32'), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from lungmae_core.contract import DEFAULT_CLASSES
from lungmae_core.errors import ConfigError
from lungmae_core.synthetic.anatomy import Grid, add_vessels_and_airways, draw_chest, lung_box, smooth_noise
from lungmae_core.synthetic.scanners import ScannerProfile, acquire, checked_acquisition
from lungmae_core.volume import Volume, canonical_affine

__all__ = ["PHANTOM_CLASSES", "Phantom", "generate_phantom"]

log = logging.getLogger(__name__)

PHANTOM_CLASSES: tuple[str, ...] = DEFAULT_CLASSES  # the built-in class list, defined once in the contract


@dataclasses.dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic chest CT and its ground truth.

    Attributes:
        hu: ``(D, H, W)`` float32 HU, canonical orientation.
        spacing_mm: ``(3,)`` voxel size along ``(D, H, W)`` in mm.
        lung_mask: ``(D, H, W)`` uint8, 1 inside the lungs (parenchyma with its vessels and small airways;
            trachea and main bronchi outside the lungs are 0).
        label: one of :data:`PHANTOM_CLASSES`.
        severity: disease severity in [0, 1] (0 for ``normal``).
        subject_seed: the seed that fixed the anatomy and the disease.
        scanner: the profile it was acquired with.
        inspiration: inspiration level in [0, 1] (1 = deep breath: larger, darker lungs).
    """

    hu: np.ndarray
    spacing_mm: np.ndarray
    lung_mask: np.ndarray
    label: str
    severity: float
    subject_seed: int
    scanner: ScannerProfile
    inspiration: float

    def to_volume(self) -> Volume:
        """The phantom as a canonical :class:`Volume` (origin at the first voxel, 0 mm)."""
        return Volume(self.hu, canonical_affine(self.spacing_mm))

    @property
    def lung_volume_ml(self) -> float:
        """True lung volume in mL."""
        return float(self.lung_mask.sum(dtype=np.int64) * np.prod(self.spacing_mm) / 1000.0)


def _spheres(frac_in: np.ndarray, frac_wall: np.ndarray | None, grid: Grid, centres: np.ndarray,
             radii: np.ndarray, wall_mm: float) -> None:
    """Rasterise spheres (cyst lumens, optionally with a wall shell) at centres given in voxel indices."""
    sp = grid.spacing
    for c, r in zip(centres, radii, strict=True):
        ext = (r + wall_mm) / sp + 2
        lo = np.clip(np.floor(c - ext).astype(int), 0, None)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, grid.shape)
        if np.any(hi <= lo):
            continue
        dz = (np.arange(lo[0], hi[0]) - c[0])[:, None, None] * sp[0]
        dy = (np.arange(lo[1], hi[1]) - c[1])[None, :, None] * sp[1]
        dx = (np.arange(lo[2], hi[2]) - c[2])[None, None, :] * sp[2]
        dist = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2).astype(np.float32)
        vox = float(sp.min())
        view = frac_in[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(view, np.clip((r - dist) / vox + 0.5, 0, 1), out=view)
        if frac_wall is not None:
            shell = np.clip((r + wall_mm - dist) / vox + 0.5, 0, 1) * np.clip((dist - r) / vox + 0.5, 0, 1)
            wv = frac_wall[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            np.maximum(wv, shell.astype(np.float32), out=wv)


def _sample_zone(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """``n`` voxel indices (rows of 3) drawn with probability proportional to ``weight`` (3D, >= 0)."""
    flat = weight.ravel().astype(np.float64)
    total = flat.sum()
    if n <= 0 or total <= 0:
        return np.zeros((0, 3))
    idx = rng.choice(flat.size, size=n, p=flat / total)
    return np.stack(np.unravel_index(idx, weight.shape), axis=1).astype(np.float64) + rng.uniform(-0.5, 0.5, (n, 3))


def _add_disease(label: str, severity: float, hu: np.ndarray, lung: np.ndarray, rho: np.ndarray,
                 t: np.ndarray, grid: Grid, rng: np.random.Generator) -> None:
    """Change the lung parenchyma of ``hu`` in place to show ``label`` at ``severity`` (in the lung box only)."""
    if label == "normal":
        return
    box = lung_box(lung)
    sub_grid = Grid(tuple(s.stop - s.start for s in box), grid.spacing)
    in_lung = lung[box] > 0
    h = hu[box]
    r = rho[box].astype(np.float32)
    tz = t[box[0]][:, None, None].astype(np.float32)
    lung_ml = float(in_lung.sum()) * float(np.prod(grid.spacing)) / 1000.0
    if label == "ggo":
        patches = smooth_noise(rng, grid, 9.0, box)
        # Lower and peripheral predominance; coverage grows with severity.
        zone = 0.6 * np.clip(1.2 - tz, 0, 1) + 0.6 * np.clip((r - 0.45) / 0.5, 0, 1) - 0.3
        score = patches + 1.6 * zone
        cover = 0.08 + 0.35 * severity
        thr = np.quantile(score[in_lung], 1.0 - cover)
        w = np.clip((score - thr) / 0.6 + 0.5, 0.0, 1.0) * in_lung
        amp = 230.0 + 230.0 * severity
        h += (w * amp * (0.75 + 0.25 * smooth_noise(rng, grid, 3.0, box))).astype(np.float32)
    elif label == "fibrosis":
        zone = np.clip((r - 0.62) / 0.25, 0, 1) * np.clip((0.55 - tz) / 0.35, 0, 1) * in_lung
        zone = zone * np.clip(0.6 + 0.5 * smooth_noise(rng, grid, 12.0, box), 0, 1)
        # Reticulation: a network of thin sheets (zero level sets of two band-limited fields).
        n1 = smooth_noise(rng, grid, 3.0, box)
        n2 = smooth_noise(rng, grid, 3.0, box)
        lines = np.clip(1.0 - np.minimum(np.abs(n1), np.abs(n2)) / 0.22, 0, 1)
        reach = zone > (0.55 - 0.45 * severity)
        h += (lines * reach * (350.0 + 350.0 * severity) + zone * reach * 260.0 * severity).astype(np.float32)
        # Honeycombing: clusters of small thick-walled cysts in the most affected subpleural base.
        n_cysts = int(lung_ml / 1000.0 * (10 + 70 * severity ** 1.5))
        hc = np.clip(zone - 0.5, 0, None) ** 2
        centres = _sample_zone(rng, hc, n_cysts)
        radii = rng.uniform(2.5, 6.0, len(centres))
        cyst = np.zeros(h.shape, np.float32)
        cwall = np.zeros(h.shape, np.float32)
        _spheres(cyst, cwall, sub_grid, centres, radii, wall_mm=1.3)
        cwall *= 1.0 - cyst
        h += (cwall * (-20.0 - h) + cyst * (-960.0 - h)) * in_lung
    elif label == "emphysema":
        upper = np.clip((tz - 0.35) / 0.4, 0, 1) * in_lung
        h -= (upper * 60.0 * severity).astype(np.float32)
        n_lesions = int(lung_ml / 1000.0 * (40 + 300 * severity))
        weight = upper * np.clip(0.7 + 0.6 * smooth_noise(rng, grid, 15.0, box), 0, None)
        centres = _sample_zone(rng, weight, n_lesions)
        radii = rng.uniform(2.0, 5.0 + 5.0 * severity, len(centres))
        laa = np.zeros(h.shape, np.float32)
        _spheres(laa, None, sub_grid, centres, radii, wall_mm=0.0)
        n_bullae = int(rng.poisson(1.0 + 5.0 * severity))
        bw = upper * np.clip((r - 0.8) / 0.15, 0, 1)
        bc = _sample_zone(rng, bw, n_bullae)
        bwall = np.zeros(h.shape, np.float32)
        _spheres(laa, bwall, sub_grid, bc, rng.uniform(8.0, 12.0 + 14.0 * severity, len(bc)), wall_mm=0.8)
        bwall *= 1.0 - laa
        laa *= in_lung
        h += laa * (-985.0 - h) + bwall * in_lung * (-300.0 - h) * 0.6
    else:  # pragma: no cover - checked by the caller
        raise AssertionError(label)
    hu[box] = h


def generate_phantom(label: str, *, seed: int, scanner: ScannerProfile | None = None, severity: float | None = None,
                     shape: Sequence[int] | None = None) -> Phantom:
    """Generate one synthetic chest CT; the same arguments always give the same phantom.

    Args:
        label: one of :data:`PHANTOM_CLASSES` (``normal``, ``ggo``, ``fibrosis``, ``emphysema``).
        seed: subject seed: fixes anatomy, inspiration, disease pattern and noise.
        scanner: acquisition profile; defaults to ``scanner_for_site(0)``.
        severity: disease severity in [0, 1]; ``None`` draws a moderate-to-severe one from ``seed``
            (0.3 + 0.7 Beta(2, 2); 0 for ``normal``).
        shape: ``(D, H, W)``; defaults to the scanner's (``n_slices``, ``matrix``, ``matrix``). The physical
            coverage stays the scanner's, so a larger shape means finer spacing (e.g. ``(300, 512, 512)`` for
            a full-resolution series).

    Returns:
        A :class:`Phantom` with HU, spacing and the true lung mask.

    Raises:
        ConfigError: for an unknown label, a severity outside [0, 1] or a shape too small for a chest.
    """
    if label not in PHANTOM_CLASSES:
        raise ConfigError(f"phantom label must be one of {', '.join(PHANTOM_CLASSES)}; got {label!r}")
    scanner, shape_t = checked_acquisition("phantom", severity, scanner, shape)
    # Separate streams: the same seed gives the same subject (anatomy, inspiration) whatever the label,
    # so a disease can be compared with the same subject's normal lungs.
    anatomy_rng = np.random.default_rng([int(seed), 0])
    disease_rng = np.random.default_rng([int(seed), 1, PHANTOM_CLASSES.index(label)])
    if label == "normal":
        sev = 0.0
    elif severity is None:
        sev = float(0.3 + 0.7 * disease_rng.beta(2.0, 2.0))
    else:
        sev = float(severity)
    subj, grid, hu, lung, rho, t = draw_chest(anatomy_rng, scanner.extent_mm, shape_t, label, sev)
    spacing = grid.spacing
    _add_disease(label, sev, hu, lung, rho, t, grid, disease_rng)
    del rho
    in_lung = add_vessels_and_airways(subj, grid, lung, anatomy_rng, hu)
    acquire(hu, scanner, spacing, np.random.default_rng([int(seed), 2]))
    log.debug("phantom %s (severity %.2f, inspiration %.2f) on %s: shape %s", label, sev, subj.inspiration,
              scanner.name, shape_t)
    return Phantom(hu=hu, spacing_mm=spacing, lung_mask=in_lung.astype(np.uint8), label=label, severity=sev,
                   subject_seed=int(seed), scanner=scanner, inspiration=subj.inspiration)
