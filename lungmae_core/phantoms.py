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
HU), and each simulated hospital has a :class:`ScannerProfile` (pixel spacing, slice thickness, matrix,
noise, reconstruction blur, HU calibration offset, patient position) so that sites are non-IID.

Arrays are canonical (docs/CONTRACTS.md): ``(D, H, W)`` pointing to ``(+S, +P, +L)``. ``patient_position``
is a fact for the DICOM writer (a feet-first series is written in the order and orientation such a scanner
would produce); the phantom itself is always returned canonical.

Examples:
    >>> p = generate_phantom("fibrosis", seed=3, scanner=scanner_for_site(0))
    >>> p.hu.shape, p.hu.dtype, p.lung_mask.dtype
    ((100, 160, 160), dtype('float32'), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

from lungmae_core.contract import DEFAULT_CLASSES
from lungmae_core.errors import ConfigError
from lungmae_core.volume import Volume, canonical_affine, sample_linear

__all__ = [
    "PHANTOM_CLASSES",
    "ScannerProfile",
    "SCANNER_PROFILES",
    "scanner_for_site",
    "Phantom",
    "generate_phantom",
    "checked_acquisition",
]

log = logging.getLogger(__name__)

PHANTOM_CLASSES: tuple[str, ...] = DEFAULT_CLASSES  # the built-in class list, defined once in the contract

_AIR = -1000.0
_FAT = -100.0
_SOFT = 40.0
_BLOOD = 45.0
_BONE = 700.0
_MARROW = 250.0
_TABLE = 150.0


@dataclasses.dataclass(frozen=True)
class ScannerProfile:
    """How one (simulated) hospital's CT scanner acquires and reconstructs a chest series.

    Args:
        name: short profile name, e.g. ``"site0-sharp"``.
        manufacturer: DICOM (0008,0070) Manufacturer the synthetic series will carry.
        model: DICOM (0008,1090) Manufacturer's Model Name.
        pixel_spacing_mm: in-plane voxel size in mm (rows and columns).
        slice_thickness_mm: reconstructed slice thickness in mm (blur along z).
        slice_spacing_mm: distance between slice centres in mm (<= thickness means overlapping slices).
        matrix: in-plane matrix size (rows = columns). Field of view = matrix x pixel spacing.
        n_slices: number of slices (z coverage = n_slices x slice spacing).
        noise_hu: standard deviation of image noise in HU (in water-like tissue).
        blur_mm: in-plane reconstruction blur (Gaussian sigma in mm; larger = softer kernel).
        hu_offset: calibration offset added to every HU value (scanners drift by a few HU to tens of HU).
        patient_position: DICOM (0018,5100) Patient Position, ``"HFS"`` or ``"FFS"``.
        kvp: tube voltage for the DICOM header.
    """

    name: str = "default"
    manufacturer: str = "LungMAE Phantom Systems"
    model: str = "Synthetic CT"
    pixel_spacing_mm: float = 2.4
    slice_thickness_mm: float = 3.0
    slice_spacing_mm: float = 3.0
    matrix: int = 160
    n_slices: int = 100
    noise_hu: float = 25.0
    blur_mm: float = 0.8
    hu_offset: float = 0.0
    patient_position: Literal["HFS", "FFS"] = "HFS"
    kvp: float = 120.0

    def __post_init__(self) -> None:
        for field in ("pixel_spacing_mm", "slice_thickness_mm", "slice_spacing_mm"):
            value = getattr(self, field)
            if not 0.1 <= value <= 20.0:
                raise ConfigError(f"ScannerProfile {field} must be in [0.1, 20] mm; got {value}")
        if not 32 <= self.matrix <= 1024:
            raise ConfigError(f"ScannerProfile matrix must be in [32, 1024]; got {self.matrix}")
        if not 8 <= self.n_slices <= 2000:
            raise ConfigError(f"ScannerProfile n_slices must be in [8, 2000]; got {self.n_slices}")
        if not 0 <= self.noise_hu <= 500 or not 0 <= self.blur_mm <= 10:
            raise ConfigError(f"ScannerProfile noise_hu must be in [0, 500] and blur_mm in [0, 10]; "
                              f"got {self.noise_hu} and {self.blur_mm}")
        if self.patient_position not in ("HFS", "FFS"):
            raise ConfigError(f"ScannerProfile patient_position must be 'HFS' or 'FFS'; got {self.patient_position!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Default phantom shape ``(D, H, W)`` for this scanner."""
        return (self.n_slices, self.matrix, self.matrix)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Physical coverage ``(z, y, x)`` in mm; fixed when a caller asks for another shape."""
        fov = self.matrix * self.pixel_spacing_mm
        return (self.n_slices * self.slice_spacing_mm, fov, fov)


# Four distinct "hospitals": vendor, resolution, kernel, noise, calibration and patient position differ.
SCANNER_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(name="site0-sharp-thin", manufacturer="SIEMENS", model="SOMATOM Synth", pixel_spacing_mm=2.3,
                   slice_thickness_mm=2.5, slice_spacing_mm=3.0, matrix=160, n_slices=100, noise_hu=30.0,
                   blur_mm=0.5, hu_offset=0.0, patient_position="HFS"),
    ScannerProfile(name="site1-soft-thick", manufacturer="GE MEDICAL SYSTEMS", model="Revolution Synth",
                   pixel_spacing_mm=2.5, slice_thickness_mm=5.0, slice_spacing_mm=3.2, matrix=160,
                   n_slices=94, noise_hu=15.0, blur_mm=1.3, hu_offset=18.0, patient_position="HFS"),
    ScannerProfile(name="site2-noisy-ffs", manufacturer="Philips", model="Ingenuity Synth", pixel_spacing_mm=2.4,
                   slice_thickness_mm=3.0, slice_spacing_mm=2.8, matrix=160, n_slices=106, noise_hu=45.0,
                   blur_mm=0.8, hu_offset=-15.0, patient_position="FFS"),
    ScannerProfile(name="site3-lowdose", manufacturer="TOSHIBA", model="Aquilion Synth", pixel_spacing_mm=2.2,
                   slice_thickness_mm=2.0, slice_spacing_mm=3.0, matrix=176, n_slices=100, noise_hu=60.0,
                   blur_mm=1.0, hu_offset=8.0, patient_position="HFS"),
)


def scanner_for_site(index: int) -> ScannerProfile:
    """The scanner profile of simulated hospital ``index`` (0, 1, 2, ...).

    The first four are the fixed :data:`SCANNER_PROFILES`; later indices get a deterministic variation of
    one of them (different spacing, noise, offset), so any number of sites stays non-IID and reproducible.
    """
    if index < 0:
        raise ConfigError(f"site index must be >= 0; got {index}")
    base = SCANNER_PROFILES[index % len(SCANNER_PROFILES)]
    if index < len(SCANNER_PROFILES):
        return base
    rng = np.random.default_rng(10_007 + index)
    return dataclasses.replace(
        base,
        name=f"site{index}-{base.name.split('-', 1)[1]}",
        pixel_spacing_mm=round(float(base.pixel_spacing_mm * rng.uniform(0.9, 1.1)), 3),
        slice_thickness_mm=round(float(base.slice_thickness_mm * rng.uniform(0.8, 1.25)), 2),
        noise_hu=round(float(base.noise_hu * rng.uniform(0.7, 1.4)), 1),
        hu_offset=round(float(rng.uniform(-25, 25)), 1),
        patient_position="FFS" if rng.random() < 0.3 else "HFS",
    )


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


@dataclasses.dataclass
class _Subject:
    """Anatomy of one subject in mm; x to the patient's left, y posterior, z superior (LPS, centred)."""

    body_ax: float
    body_ay: float
    body_cy: float
    fat: float
    wall: float
    z_base: float          # lowest lung point (costophrenic recess) above the first slice
    lung_h: float
    dome_h: float
    right_dome_extra: float
    medial: float
    heart: tuple[float, float, float, float, float, float]
    lung_shape_n: float
    inspiration: float
    parenchyma_hu: float
    stomach: tuple[float, float, float, float] | None
    rib_period: float
    rib_slope: float
    rib_phase: float

    def lung_geometry(self, side: int) -> tuple[float, float, float, float]:
        """(cx, cy, rx, ry) of the lung on ``side`` (-1 right, +1 left) at its widest, in mm."""
        lateral = self.body_ax - self.fat - self.wall
        medial = self.medial + (10.0 if side > 0 else 0.0)
        cx = side * (medial + lateral) / 2.0
        rx = (lateral - medial) / 2.0
        cav = self.body_ay - self.fat - self.wall
        cy = self.body_cy + 0.08 * cav
        ry = 0.93 * cav
        return cx, cy, rx, ry


def _make_subject(rng: np.random.Generator, extent_mm: tuple[float, float, float], label: str,
                  severity: float) -> _Subject:
    ez, ey, ex = extent_mm
    half = min(ex, ey) / 2.0
    body_ax = min(rng.uniform(140, 185), 0.47 * ex)
    body_ay = min(rng.uniform(0.62, 0.76) * body_ax, 0.40 * ey)
    inspiration = float(rng.uniform(0.0, 1.0))
    fat = rng.uniform(6, 26)
    lung_h = rng.uniform(195, 255) * (0.92 + 0.12 * inspiration)
    if label == "fibrosis":
        lung_h *= 1.0 - 0.15 * severity  # volume loss
    elif label == "emphysema":
        lung_h *= 1.0 + 0.10 * severity  # hyperinflation
    lung_h = min(lung_h, ez - 45.0)
    z_base = rng.uniform(20, max(21.0, ez - lung_h - 15.0))
    z_base = min(z_base, 0.25 * ez)
    parenchyma = -845.0 - 70.0 * (inspiration - 0.5) + rng.normal(0, 12)
    hx = rng.uniform(10, 45)
    heart = (hx, -0.3 * body_ay, z_base + rng.uniform(0.12, 0.22) * lung_h,
             rng.uniform(55, 70), rng.uniform(45, 58), rng.uniform(45, 58))
    stomach = None
    if rng.random() < 0.7:
        stomach = (rng.uniform(50, 80), -0.25 * body_ay, z_base - rng.uniform(15, 25), rng.uniform(15, 30))
    return _Subject(
        body_ax=body_ax, body_ay=body_ay, body_cy=rng.uniform(-0.03, 0.03) * half, fat=fat,
        wall=rng.uniform(14, 20), z_base=z_base, lung_h=lung_h, dome_h=rng.uniform(35, 60) * (1.1 - 0.3 * inspiration),
        right_dome_extra=rng.uniform(5, 20), medial=rng.uniform(22, 34),
        heart=heart, lung_shape_n=rng.uniform(2.2, 3.0), inspiration=inspiration, parenchyma_hu=parenchyma,
        stomach=stomach, rib_period=rng.uniform(24, 30), rib_slope=rng.uniform(0.25, 0.45),
        rib_phase=rng.uniform(0, 30),
    )


class _Grid:
    """Voxel-centre coordinates of the canonical grid in subject mm (x left, y posterior, z superior)."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray):
        d, h, w = shape
        self.shape = shape
        self.spacing = spacing
        self.z = (np.arange(d, dtype=np.float32) + 0.5) * np.float32(spacing[0])
        self.y = (np.arange(h, dtype=np.float32) - (h - 1) / 2.0) * np.float32(spacing[1])
        self.x = (np.arange(w, dtype=np.float32) - (w - 1) / 2.0) * np.float32(spacing[2])

    def index(self, point: np.ndarray) -> np.ndarray:
        """Fractional voxel index ``(d, h, w)`` of a point ``(x, y, z)`` in mm."""
        x, y, z = point
        d, h, w = self.shape
        return np.array([z / self.spacing[0] - 0.5, y / self.spacing[1] + (h - 1) / 2.0,
                         x / self.spacing[2] + (w - 1) / 2.0])


def _smooth_noise(rng: np.random.Generator, grid: _Grid, sigma_mm: float, box: tuple[slice, ...] | None = None,
                  ) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_mm``, on ``grid[box]``.

    Generated on a coarse grid (about sigma/2 spacing) and upsampled trilinearly, so its cost does not grow
    with the output resolution.
    """
    box = box or tuple(slice(0, n) for n in grid.shape)
    counts = [s.stop - s.start for s in box]
    # Never finer than the voxel grid: a small sigma is filtered on the voxels themselves.
    steps = [max(sigma_mm / 2.0, float(sp)) for sp in grid.spacing]
    coarse_n = [max(2, int(math.ceil(n * sp / st)) + 1) for n, sp, st in zip(counts, grid.spacing, steps)]
    white = rng.standard_normal(coarse_n, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma=[sigma_mm / st for st in steps], mode="wrap", truncate=3.0)
    field /= max(float(field.std()), 1e-6)
    coords = [np.arange(n, dtype=np.float64) * sp / st for n, sp, st in zip(counts, grid.spacing, steps)]
    return sample_linear(field, coords)


def _lung_field(subj: _Subject, side: int, X: np.ndarray, Y: np.ndarray, Z: np.ndarray,
                wobble: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Implicit lung function: returns (inside mask, radial coordinate rho in [0, 1] inside)."""
    cx, cy, rx, ry = subj.lung_geometry(side)
    t = (Z - subj.z_base) / subj.lung_h  # 0 at the base, 1 at the apex
    taper = np.sqrt(np.clip(1.0 - np.clip((t - 0.45) / 0.58, 0.0, None) ** 2, 0.0, 1.0))
    taper = taper * (0.93 + 0.07 * np.clip(t / 0.25, 0.0, 1.0))
    # The lung narrows toward the apex mostly from its lateral and anterior sides.
    ax = rx * np.maximum(taper, 1e-3)
    ay = ry * np.maximum(taper, 1e-3)
    ccx = cx - side * rx * (1.0 - taper) * 0.6
    ccy = cy + ry * (1.0 - taper) * 0.35
    n = subj.lung_shape_n
    u = np.abs((X - ccx) / ax)
    v = np.abs((Y - ccy) / ay)
    f = u ** n + v ** n
    rho = f ** (1.0 / n) * (1.0 + 0.06 * wobble)
    # Diaphragm dome: higher centrally, the recesses reach z_base; the right dome sits higher.
    r2 = np.clip(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2, 0.0, 1.0)
    dome = subj.z_base + (subj.dome_h + (subj.right_dome_extra if side < 0 else 0.0)) * (1.0 - r2)
    inside = (rho < 1.0) & (Z > dome) & (t < 1.0)
    return inside, rho


def _render_anatomy(subj: _Subject, grid: _Grid, rng: np.random.Generator,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body, bones, mediastinum and lung masks, slab by slab to bound memory at 512x512x300.

    Returns:
        hu (background anatomy, lungs filled with parenchyma HU), lung (uint8 1 right / 2 left),
        rho (radial lung coordinate, float16), zone t (relative lung height, float16).
    """
    d, h, w = grid.shape
    hu = np.empty(grid.shape, np.float32)
    lung = np.zeros(grid.shape, np.uint8)
    rho_all = np.ones(grid.shape, np.float16)
    wobble = _smooth_noise(rng, grid, 30.0)
    texture = _smooth_noise(rng, grid, 4.0)
    Y = grid.y[None, :, None]
    X = grid.x[None, None, :]
    s = subj
    slab = max(1, int(4_000_000 // (h * w)))
    hx, hy, hz, hax, hay, haz = s.heart
    cav_y = s.body_ay - s.fat - s.wall
    spine_cy = s.body_cy + s.body_ay - s.fat - 38.0
    for z0 in range(0, d, slab):
        z1 = min(d, z0 + slab)
        Z = grid.z[z0:z1, None, None]
        wob = wobble[z0:z1]
        # Body ellipse (slightly narrower in the abdomen and towards the neck), fat ring, muscle inside.
        zrel = (Z - s.z_base) / s.lung_h
        widen = 1.0 - 0.06 * np.clip(-zrel, 0, 1) - 0.10 * np.clip(zrel - 1.0, 0, 1)
        bx, by = s.body_ax * widen, s.body_ay * widen
        e = ((X / bx) ** 2 + ((Y - s.body_cy) / by) ** 2) * (1.0 + 0.015 * wob)
        e_in = (X / (bx - s.fat)) ** 2 + ((Y - s.body_cy) / (by - s.fat)) ** 2
        out = np.full(e.shape, _AIR, np.float32)
        out = np.where(e < 1.0, np.float32(_FAT), out)
        out = np.where(e_in < 1.0, np.float32(_SOFT), out)
        # Patient table below the back (posterior), separated by a gap.
        ty = s.body_cy + s.body_ay + 12.0
        table = (Y > ty + 0.0006 * X ** 2) & (Y < ty + 8.0 + 0.0006 * X ** 2) & (np.abs(X) < 0.95 * s.body_ax + 20)
        out = np.where(table, np.float32(_TABLE), out)
        # Mediastinal fat between the lungs in the chest.
        in_chest = (zrel > -0.05) & (zrel < 1.05)
        med = in_chest & (np.abs(X) < s.medial + 15) & (np.abs(Y - s.body_cy) < cav_y)
        out = np.where(med, np.float32(-80.0), out)
        # Heart and the descending aorta.
        heart = ((X - hx) / hax) ** 2 + ((Y - hy) / hay) ** 2 + ((Z - hz) / haz) ** 2 < 1.0
        aorta = ((X - 22.0) ** 2 + (Y - (spine_cy - 28.0)) ** 2 < 13.0 ** 2) & (zrel < 0.85) & (zrel > -0.3)
        out = np.where(heart | aorta, np.float32(_BLOOD), out)
        # Liver below the right dome, a stomach bubble under the left one.
        liver = (X < 40) & (zrel < 0.05) & (e_in < 0.9)
        out = np.where(liver & (out > -500), np.float32(58.0), out)
        if s.stomach is not None:
            gx, gy, gz, gr = s.stomach
            bubble = (X - gx) ** 2 + (Y - gy) ** 2 + ((Z - gz) * 1.3) ** 2 < gr ** 2
            out = np.where(bubble, np.float32(_AIR + 30.0), out)
        # Spine: vertebral body with cortical rim, canal behind it.
        rv = np.sqrt(X ** 2 + (Y - spine_cy) ** 2)
        out = np.where(rv < 20.0, np.float32(_MARROW), out)
        out = np.where((rv >= 17.5) & (rv < 20.0), np.float32(_BONE), out)
        canal = np.sqrt(X ** 2 + (Y - spine_cy - 28.0) ** 2)
        out = np.where((canal < 16.0) & (canal >= 10.0) & (e_in < 1.0), np.float32(_BONE * 0.8), out)
        # Ribs: oblique bony bars in the chest wall (bright cortex, darker marrow), descending from the spine
        # to the front, so an axial slice cuts each one into a short arc; none at the spine or the sternum.
        theta = np.arctan2(X, -(Y - s.body_cy))  # 0 anterior, +-pi posterior
        q = np.sqrt((X / (bx - s.fat - 0.45 * s.wall)) ** 2 + ((Y - s.body_cy) / (by - s.fat - 0.45 * s.wall)) ** 2)
        d_rad = (q - 1.0) * (0.5 * (bx + by) - s.fat)
        phase = np.mod(Z + s.rib_slope * 80.0 * (np.pi - np.abs(theta)) + s.rib_phase, s.rib_period)
        rib_r = (d_rad / 5.5) ** 2 + ((phase - s.rib_period / 2) / 4.5) ** 2
        rib = (rib_r < 1.0) & (np.abs(theta) > 0.45) & (np.abs(theta) < np.pi - 0.3) & in_chest & (zrel < 1.08)
        out = np.where(rib, (300.0 + 500.0 * rib_r).astype(np.float32), out)
        sternum = in_chest & (np.abs(X) < 16) & (Y - s.body_cy < -(by - s.fat - 14)) & (Y - s.body_cy > -(by - s.fat))
        out = np.where(sternum, np.float32(_MARROW + 100.0), out)
        # Lungs.
        par = (s.parenchyma_hu + 45.0 * (Y - s.body_cy + cav_y) / (2 * cav_y)  # gravity: posterior denser
               + 12.0 * texture[z0:z1])
        for side, code in ((-1, 1), (1, 2)):
            inside, rho = _lung_field(s, side, X, Y, Z, wob)
            # Inside the rib cage: at least ~7 mm of chest wall beyond the ribs' centre line.
            inside &= ~heart & ~aorta & (np.abs(X) > s.medial) & (rv > 26.0) & (d_rad < -7.0)
            out = np.where(inside, par, out)
            lung[z0:z1][inside] = code
            rho_all[z0:z1][inside] = rho[inside]
        hu[z0:z1] = out
    t_all = ((grid.z - s.z_base) / s.lung_h).astype(np.float16)
    return hu, lung, rho_all, t_all


def _draw_tube(frac: np.ndarray, grid: _Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> None:
    """Rasterise a tapered tube (p0 -> p1, radii r0 -> r1 mm) into ``frac`` as partial-volume fractions."""
    # Plain Python arithmetic for the bounding box: thousands of small tubes make NumPy call overhead matter.
    x0, y0, z0 = (float(v) for v in p0)
    x1, y1, z1 = (float(v) for v in p1)
    sd, sh, sw = (float(v) for v in grid.spacing)
    d, h, w = grid.shape
    pad = max(r0, r1) + 2.0 * max(sd, sh, sw)
    lo_d = max(int((min(z0, z1) - pad) / sd - 0.5), 0)
    hi_d = min(int((max(z0, z1) + pad) / sd - 0.5) + 2, d)
    lo_h = max(int((min(y0, y1) - pad) / sh + (h - 1) / 2.0), 0)
    hi_h = min(int((max(y0, y1) + pad) / sh + (h - 1) / 2.0) + 2, h)
    lo_w = max(int((min(x0, x1) - pad) / sw + (w - 1) / 2.0), 0)
    hi_w = min(int((max(x0, x1) + pad) / sw + (w - 1) / 2.0) + 2, w)
    if hi_d <= lo_d or hi_h <= lo_h or hi_w <= lo_w:
        return
    Z = grid.z[lo_d:hi_d, None, None] - np.float32(z0)
    Y = grid.y[None, lo_h:hi_h, None] - np.float32(y0)
    X = grid.x[None, None, lo_w:hi_w] - np.float32(x0)
    gx, gy, gz = x1 - x0, y1 - y0, z1 - z0
    inv = 1.0 / (gx * gx + gy * gy + gz * gz + 1e-6)
    tt = X * np.float32(gx * inv) + Y * np.float32(gy * inv) + Z * np.float32(gz * inv)
    np.clip(tt, 0.0, 1.0, out=tt)
    dist2 = (X - tt * np.float32(gx)) ** 2 + (Y - tt * np.float32(gy)) ** 2 + (Z - tt * np.float32(gz)) ** 2
    vox = min(sd, sh, sw)
    # fraction = clip((r(t) - dist) / vox + 0.5, 0, 1)
    f = tt * np.float32((r1 - r0) / vox) + np.float32(r0 / vox + 0.5)
    f -= np.sqrt(dist2) * np.float32(1.0 / vox)
    np.clip(f, 0.0, 1.0, out=f)
    view = frac[lo_d:hi_d, lo_h:hi_h, lo_w:hi_w]
    np.maximum(view, f, out=view)


def _grow_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, radius: float, length: float,
               generations: int, inside: Callable[[np.ndarray], bool], min_radius: float = 0.0,
               ) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A branching tree of segments (p0, p1, r0, r1) that stays inside the lung; bifurcates at each node."""
    segments = []
    stack = [(root, direction / np.linalg.norm(direction), radius, length, 0)]
    while stack:
        p, dvec, r, ln, g = stack.pop()
        end = p + dvec * ln
        if g > 0 and not inside(end):
            # Shorten once before giving up on the branch.
            end = p + dvec * ln * 0.5
            if not inside(end):
                continue
        segments.append((p, end, r, r * 0.85))
        if g + 1 >= generations or r * 0.77 < min_radius:
            continue
        for _ in range(2):
            for _attempt in range(4):
                jitter = rng.normal(0.0, 1.0, 3)
                jitter -= jitter @ dvec * dvec
                jitter /= np.linalg.norm(jitter) + 1e-9
                angle = rng.uniform(0.35, 0.75)
                child = dvec * math.cos(angle) + jitter * math.sin(angle)
                if inside(end + child * ln * 0.8):
                    break
            stack.append((end, child, r * rng.uniform(0.72, 0.82), ln * rng.uniform(0.72, 0.86), g + 1))
    return segments


def _lung_vessels_and_airways(subj: _Subject, grid: _Grid, lung: np.ndarray, rng: np.random.Generator,
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessel fraction, airway-wall fraction and airway-lumen fraction volumes (float32 in [0, 1])."""
    vessels = np.zeros(grid.shape, np.float32)
    wall = np.zeros(grid.shape, np.float32)
    lumen = np.zeros(grid.shape, np.float32)

    sd, sh, sw = (float(v) for v in grid.spacing)
    nd, nh, nw = grid.shape
    thin: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    thin_radius = 0.75 * float(grid.spacing.min())

    def inside(point: np.ndarray) -> bool:
        x, y, z = point.tolist()
        i, j, k = round(z / sd - 0.5), round(y / sh + (nh - 1) / 2.0), round(x / sw + (nw - 1) / 2.0)
        return 0 <= i < nd and 0 <= j < nh and 0 <= k < nw and bool(lung[i, j, k])

    carina_z = subj.z_base + 0.62 * subj.lung_h
    top_z = float(grid.z[-1]) + 5.0
    spine_cy = subj.body_cy + subj.body_ay - subj.fat - 38.0
    trachea_y = spine_cy - 45.0
    carina = np.array([0.0, trachea_y, carina_z])
    tr_r = rng.uniform(7.5, 10.0)
    _draw_tube(wall, grid, np.array([0.0, trachea_y, top_z]), carina, tr_r + 1.8, tr_r + 1.8)
    _draw_tube(lumen, grid, np.array([0.0, trachea_y, top_z]), carina, tr_r, tr_r)
    for side in (-1, 1):
        cx, cy, rx, ry = subj.lung_geometry(side)
        hilum = np.array([side * (subj.medial + 14.0), cy - 0.1 * ry, subj.z_base + 0.52 * subj.lung_h])
        _draw_tube(wall, grid, carina, hilum, 0.7 * tr_r + 1.5, 0.55 * tr_r + 1.3)
        _draw_tube(lumen, grid, carina, hilum, 0.7 * tr_r, 0.55 * tr_r)
        # Arteries fan out from the hilum to every lobe; veins drain to a point a little lower and behind.
        arteries = [(0.4, -0.3, 1.0), (0.5, 0.5, 0.9), (1.0, -0.4, 0.2), (0.9, 0.6, 0.0),
                    (0.6, -0.6, -0.8), (0.6, 0.7, -0.9), (1.0, 0.1, -0.6)]
        veins = [(0.7, -0.2, 0.8), (0.9, 0.5, 0.3), (0.8, -0.5, -0.6), (0.7, 0.6, -0.7)]
        roots = [(hilum, a, 1.0) for a in arteries] + [(hilum + np.array([0.0, 12.0, -22.0]), v, 0.9) for v in veins]
        for k, (origin, direction, scale) in enumerate(roots):
            start = origin + np.array([side * 6.0, 0.0, 0.0])
            direction = np.array([side * direction[0], direction[1], direction[2]])
            segs = _grow_tree(rng, start, direction + rng.normal(0, 0.15, 3), scale * rng.uniform(4.2, 5.5),
                              rng.uniform(24, 32), 8, inside, min_radius=0.3 * float(grid.spacing.min()))
            thin.extend(seg for seg in segs if seg[2] < thin_radius)
            for p0, p1, r0, r1 in segs:
                if r0 < thin_radius:
                    continue
                _draw_tube(vessels, grid, p0, p1, r0, r1)
                if r0 > 2.2:  # bronchi run beside the arteries; only the larger ones are visible on CT
                    off = np.cross(p1 - p0, np.array([0.0, 0.0, 1.0]))
                    off = off / (np.linalg.norm(off) + 1e-9) * (r0 + 0.8 * r0 + 1.0)
                    ar = 0.7 * r0
                    _draw_tube(wall, grid, p0 + off, p1 + off, ar + 0.5 + 0.12 * ar, 0.85 * ar + 0.5)
                    _draw_tube(lumen, grid, p0 + off, p1 + off, ar, 0.85 * ar)
    _splat_thin_tubes(vessels, grid, thin)
    return vessels, wall, lumen


def _splat_thin_tubes(frac: np.ndarray, grid: _Grid, segments: list[tuple[np.ndarray, np.ndarray, float, float]],
                      ) -> None:
    """Vessels thinner than a voxel, all at once: their partial volume (cross-section / voxel face) is put
    on the voxels along each centreline; the reconstruction blur later spreads it like a scanner would."""
    if not segments:
        return
    sp = grid.spacing
    step = 0.5 * float(sp.min())
    points, radii = [], []
    for p0, p1, r0, r1 in segments:
        n = max(2, int(np.linalg.norm(p1 - p0) / step) + 1)
        t = np.linspace(0.0, 1.0, n)[:, None]
        points.append(p0 + (p1 - p0) * t)
        radii.append(r0 + (r1 - r0) * t[:, 0])
    pts = np.concatenate(points)
    r = np.concatenate(radii)
    d, h, w = grid.shape
    idx = np.stack([np.rint(pts[:, 2] / sp[0] - 0.5), np.rint(pts[:, 1] / sp[1] + (h - 1) / 2.0),
                    np.rint(pts[:, 0] / sp[2] + (w - 1) / 2.0)], axis=1).astype(np.intp)
    ok = np.all((idx >= 0) & (idx < np.array(grid.shape)), axis=1)
    value = np.minimum(np.pi * r[ok] ** 2 / float(sp[1] * sp[2]), 1.0).astype(np.float32)
    np.maximum.at(frac, (idx[ok, 0], idx[ok, 1], idx[ok, 2]), value)


def _lung_box(lung: np.ndarray) -> tuple[slice, slice, slice]:
    idx = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)  # type: ignore[return-value]


def _spheres(frac_in: np.ndarray, frac_wall: np.ndarray | None, grid: _Grid, centres: np.ndarray,
             radii: np.ndarray, wall_mm: float) -> None:
    """Rasterise spheres (cyst lumens, optionally with a wall shell) at centres given in voxel indices."""
    sp = grid.spacing
    for c, r in zip(centres, radii):
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
                 t: np.ndarray, grid: _Grid, rng: np.random.Generator) -> None:
    """Change the lung parenchyma of ``hu`` in place to show ``label`` at ``severity`` (in the lung box only)."""
    if label == "normal":
        return
    box = _lung_box(lung)
    sub_grid = _Grid(tuple(s.stop - s.start for s in box), grid.spacing)
    in_lung = lung[box] > 0
    h = hu[box]
    r = rho[box].astype(np.float32)
    tz = t[box[0]][:, None, None].astype(np.float32)
    lung_ml = float(in_lung.sum()) * float(np.prod(grid.spacing)) / 1000.0
    if label == "ggo":
        patches = _smooth_noise(rng, grid, 9.0, box)
        # Lower and peripheral predominance; coverage grows with severity.
        zone = 0.6 * np.clip(1.2 - tz, 0, 1) + 0.6 * np.clip((r - 0.45) / 0.5, 0, 1) - 0.3
        score = patches + 1.6 * zone
        cover = 0.08 + 0.35 * severity
        thr = np.quantile(score[in_lung], 1.0 - cover)
        w = np.clip((score - thr) / 0.6 + 0.5, 0.0, 1.0) * in_lung
        amp = 230.0 + 230.0 * severity
        h += (w * amp * (0.75 + 0.25 * _smooth_noise(rng, grid, 3.0, box))).astype(np.float32)
    elif label == "fibrosis":
        zone = np.clip((r - 0.62) / 0.25, 0, 1) * np.clip((0.55 - tz) / 0.35, 0, 1) * in_lung
        zone = zone * np.clip(0.6 + 0.5 * _smooth_noise(rng, grid, 12.0, box), 0, 1)
        # Reticulation: a network of thin sheets (zero level sets of two band-limited fields).
        n1 = _smooth_noise(rng, grid, 3.0, box)
        n2 = _smooth_noise(rng, grid, 3.0, box)
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
        weight = upper * np.clip(0.7 + 0.6 * _smooth_noise(rng, grid, 15.0, box), 0, None)
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


def checked_acquisition(what: str, severity: float | None, scanner: ScannerProfile | None,
                        shape: Sequence[int] | None) -> tuple[ScannerProfile, tuple[int, int, int]]:
    """The scanner (default: site 0's) and the (D, H, W) shape of a phantom, after checking ``severity``.

    Raises:
        ConfigError: naming ``what``, for a severity outside [0, 1] or a shape that is not three sizes >= 16.
    """
    if severity is not None and not 0.0 <= severity <= 1.0:
        raise ConfigError(f"{what} severity must be in [0, 1]; got {severity}")
    scanner = scanner or scanner_for_site(0)
    shape_t = tuple(int(n) for n in (shape or scanner.shape))
    if len(shape_t) != 3 or min(shape_t) < 16:
        raise ConfigError(f"{what} shape must be three sizes (D, H, W), each >= 16; got {shape_t}")
    return scanner, shape_t


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
    extent = scanner.extent_mm
    spacing = np.array([e / n for e, n in zip(extent, shape_t)], dtype=np.float64)
    grid = _Grid(shape_t, spacing)
    subj = _make_subject(anatomy_rng, extent, label, sev)
    hu, lung, rho, t = _render_anatomy(subj, grid, anatomy_rng)
    _add_disease(label, sev, hu, lung, rho, t, grid, disease_rng)
    vessels, wall, lumen = _lung_vessels_and_airways(subj, grid, lung, anatomy_rng)
    in_lung = lung > 0
    vessels *= in_lung
    hu += vessels * (_BLOOD - hu)
    hu += wall * (_SOFT - hu)
    hu += lumen * (_AIR - hu)
    del vessels, wall, lumen, rho
    _acquire(hu, scanner, spacing, np.random.default_rng([int(seed), 2]))
    log.debug("phantom %s (severity %.2f, inspiration %.2f) on %s: shape %s", label, sev, subj.inspiration,
              scanner.name, shape_t)
    return Phantom(hu=hu, spacing_mm=spacing, lung_mask=in_lung.astype(np.uint8), label=label, severity=sev,
                   subject_seed=int(seed), scanner=scanner, inspiration=subj.inspiration)


def _acquire(hu: np.ndarray, scanner: ScannerProfile, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """Scanner physics in place: reconstruction blur, slice-thickness blur, correlated noise, HU offset, clip."""
    _blur(hu, scanner, spacing)
    _noise_and_calibration(hu, scanner, rng)


def _blur(hu: np.ndarray, scanner: ScannerProfile, spacing: np.ndarray) -> None:
    """Reconstruction kernel (in-plane) and slice-thickness (z) blur, in place."""
    z_sigma = max(scanner.slice_thickness_mm, spacing[0]) / 2.355 / spacing[0]
    xy_sigma = scanner.blur_mm / spacing[1:]
    ndimage.gaussian_filter(hu, sigma=(z_sigma * 0.6, xy_sigma[0], xy_sigma[1]), output=hu, truncate=3.0)


def _noise_and_calibration(hu: np.ndarray, scanner: ScannerProfile, rng: np.random.Generator) -> None:
    """Correlated image noise (dose), HU calibration offset and the 12-bit range clip, in place."""
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma=(0.0, 0.7, 0.7), output=noise, truncate=3.0)
    noise *= np.float32(scanner.noise_hu / 0.40)  # a 0.7-voxel Gaussian leaves ~0.40 of unit white-noise std
    hu += noise
    del noise
    hu += np.float32(scanner.hu_offset)
    np.clip(hu, -1024.0, 3071.0, out=hu)
