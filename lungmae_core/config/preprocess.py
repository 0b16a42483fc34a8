"""Parameters of the preprocessing of one CT volume (:class:`PreprocessConfig`, the ``preprocess`` section of
``site.yaml``) and the algorithm version that, with them, keys every cached sample.

They live here, apart from :mod:`lungmae_core.preprocess`, because both the preprocessing and the lung mask
(:mod:`lungmae_core.lungmask`, which the preprocessing calls) read them: one definition both import, so
neither module imports the other for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from lungmae_core.config.loader import check, to_mapping

__all__ = ["PREPROCESS_VERSION", "PreprocessConfig"]

# Bump when the algorithm changes in a way that changes outputs: it is part of every cache key.
PREPROCESS_VERSION = 3  # 3: the crop margin is in millimetres (margin_mm)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of :func:`~lungmae_core.preprocess.preprocess_volume` (the ``preprocess`` section of ``site.yaml``).

    Args:
        size: side of the output cube in voxels. Defaults to 128 (the paper).
        margin_mm: margin around the lung box in millimetres. Defaults to 20. The paper's margin is 32
            isotropic voxels, which on a 2-5 mm series is 60-150 mm of chest wall, table and air on every
            side: the lungs then fill 5-7% of a 64^3 cube and about 7 of its 64 tokens (measured on the
            built-in phantoms). 20 mm keeps the pleura and chest wall and gives the lungs about 16%.
        margin_voxels: the paper's margin in isotropic voxels of the mean input spacing; when set it replaces
            ``margin_mm`` (``None``: use ``margin_mm``). Defaults to None.
        hu_min: lower end of the HU window (maps to 0). Defaults to -1000.
        hu_max: upper end of the HU window (maps to 1). Defaults to 200.
        air_threshold_hu: voxels below are air (lung candidates). Defaults to -320.
        body_threshold_hu: voxels above are body (its largest component, holes filled). Defaults to -500.
        mask_spacing_mm: approximate voxel size (mm) at which the lung mask is computed; 0 = input
            resolution. Defaults to 3.0 (about the voxel size of a 128 cube of a chest).
        closing_mm: radius of the morphological closing of the lung mask in mm. Defaults to 3.0.
        max_hole_mm2: per-slice holes in the mask up to this area (mm^2, vessels) are filled. Defaults to 700.
        min_component_ml: smallest air component (mL) that may be a lung. Defaults to 80.
        second_lung_fraction: a second air component is kept only if it is at least this fraction of the
            largest (else it is gas in the bowel or stomach). Defaults to 0.1.
        min_lung_ml: scans with less total lung are rejected (head, abdomen, cut-off lungs). Defaults to 500.
        max_lung_ml: scans with more are rejected (air outside the patient, wrong HU). Defaults to 12000.
        antialias: when an output voxel spans two or more input voxels along an axis, average blocks of
            input voxels before interpolating (box prefilter), so image noise is averaged rather than aliased
            into the cube. ``False`` interpolates the raw voxels, as the authors' resize did. Defaults to True.
    """

    size: int = 128
    margin_mm: float = 20.0
    margin_voxels: int | None = None
    hu_min: float = -1000.0
    hu_max: float = 200.0
    air_threshold_hu: float = -320.0
    body_threshold_hu: float = -500.0
    mask_spacing_mm: float = 3.0
    closing_mm: float = 3.0
    max_hole_mm2: float = 700.0
    min_component_ml: float = 80.0
    second_lung_fraction: float = 0.1
    min_lung_ml: float = 500.0
    max_lung_ml: float = 12000.0
    antialias: bool = True

    def __post_init__(self) -> None:
        check(8 <= self.size <= 1024, f"preprocess size must be in [8, 1024] voxels; got {self.size}")
        check(self.margin_mm >= 0, f"preprocess margin-mm must be >= 0; got {self.margin_mm}")
        check(self.margin_voxels is None or self.margin_voxels >= 0,
              f"preprocess margin-voxels must be >= 0 or null; got {self.margin_voxels}")
        check(self.hu_max > self.hu_min,
              f"preprocess hu-max ({self.hu_max:g}) must be greater than hu-min ({self.hu_min:g})")
        check(self.mask_spacing_mm >= 0 and self.closing_mm >= 0 and self.max_hole_mm2 >= 0,
              "preprocess mask-spacing-mm, closing-mm and max-hole-mm2 must be >= 0; got "
              f"{self.mask_spacing_mm}, {self.closing_mm}, {self.max_hole_mm2}")
        check(0 <= self.second_lung_fraction <= 1,
              f"preprocess second-lung-fraction must be in [0, 1]; got {self.second_lung_fraction}")
        check(0 <= self.min_lung_ml < self.max_lung_ml,
              f"preprocess min-lung-ml ({self.min_lung_ml:g}) must be >= 0 and below max-lung-ml "
              f"({self.max_lung_ml:g})")

    def margin_in_mm(self, iso_spacing_mm: float) -> float:
        """The crop margin in mm for a series of mean spacing ``iso_spacing_mm``."""
        if self.margin_voxels is not None:
            return self.margin_voxels * iso_spacing_mm
        return self.margin_mm

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of every parameter and the algorithm version (part of cache keys)."""
        payload = json.dumps({"version": PREPROCESS_VERSION, **to_mapping(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
