"""Simulated hospitals' CT scanners: how each acquires and reconstructs a chest series, and what that does to
the image (reconstruction and slice blur, correlated noise, HU calibration offset).

Each simulated site has a :class:`ScannerProfile` (:func:`scanner_for_site`), so sites are non-IID the way
real hospitals are; the DICOM writer (:mod:`lungmae_core.synthetic.dicom_writer`) carries the same profile
into the files' headers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

from lungmae_core.errors import ConfigError

__all__ = ["SCANNER_PROFILES", "ScannerProfile", "acquire", "blur", "checked_acquisition", "noise_and_calibration",
           "scanner_for_site"]


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


def acquire(hu: np.ndarray, scanner: ScannerProfile, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """Scanner physics in place: reconstruction blur, slice-thickness blur, correlated noise, HU offset, clip."""
    blur(hu, scanner, spacing)
    noise_and_calibration(hu, scanner, rng)


def blur(hu: np.ndarray, scanner: ScannerProfile, spacing: np.ndarray) -> None:
    """Reconstruction kernel (in-plane) and slice-thickness (z) blur, in place."""
    z_sigma = max(scanner.slice_thickness_mm, spacing[0]) / 2.355 / spacing[0]
    xy_sigma = scanner.blur_mm / spacing[1:]
    ndimage.gaussian_filter(hu, sigma=(z_sigma * 0.6, xy_sigma[0], xy_sigma[1]), output=hu, truncate=3.0)


def noise_and_calibration(hu: np.ndarray, scanner: ScannerProfile, rng: np.random.Generator) -> None:
    """Correlated image noise (dose), HU calibration offset and the 12-bit range clip, in place."""
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma=(0.0, 0.7, 0.7), output=noise, truncate=3.0)
    noise *= np.float32(scanner.noise_hu / 0.40)  # a 0.7-voxel Gaussian leaves ~0.40 of unit white-noise std
    hu += noise
    del noise
    hu += np.float32(scanner.hu_offset)
    np.clip(hu, -1024.0, 3071.0, out=hu)
