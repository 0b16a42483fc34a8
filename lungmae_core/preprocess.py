"""Preprocessing of one CT volume into a training sample: the docs/model.md recipe in one trilinear pass.

canonical orientation -> lung mask -> crop to the lung box with a margin -> cube of ``size``^3 -> HU window
to [0, 1]. The authors resample the full volume to isotropic voxels (cubic), crop, then resize; isotropic
resampling followed by a cube resize is one axis-aligned linear map, so we compute the lung mask on a
coarse grid, find the crop box in millimetres, and sample the cropped region of the original volume
straight onto the output cube (one separable trilinear pass). On a 512x512x300 series this is many times
faster and needs a fraction of the memory (``benchmarks/prepare.py`` measures both side by side).

Examples:
    >>> from lungmae_core.config import PreprocessConfig
    >>> from lungmae_core.synthetic.phantoms import generate_phantom
    >>> sample = preprocess_volume(generate_phantom("normal", seed=0).to_volume(), PreprocessConfig(size=64))
    >>> sample.image.shape, sample.image.dtype, sample.lung_mask.dtype
    ((1, 64, 64, 64), dtype('float32'), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
from scipy import ndimage

from lungmae_core.config import PreprocessConfig
from lungmae_core.errors import InvalidSeriesError
from lungmae_core.lungmask import block_mean, coarse_lung_mask
from lungmae_core.volume import Volume, sample_linear, to_canonical

__all__ = ["Sample", "preprocess_volume", "reference_preprocess", "crop_box_mm"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One preprocessed scan.

    Attributes:
        image: ``(1, S, S, S)`` float32 in [0, 1] (HU window).
        lung_mask: ``(1, S, S, S)`` uint8, 1 inside the lungs, aligned with ``image``.
        qc: per-scan quality figures (stay at the site): ``lung_volume_ml``, ``spacing_mm``,
            ``input_shape``, ``orientation``, ``crop_mm``, ``hu_mean``, ``hu_std``, ``hu_p05``, ``hu_p50``,
            ``hu_p95`` (HU inside the lungs).
    """

    image: np.ndarray
    lung_mask: np.ndarray
    qc: dict[str, Any]


class _Clock:
    """Accumulates stage durations into ``timings`` when the caller asked for them."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def _check_input(volume: Volume) -> None:
    if min(volume.shape) < 4:
        raise InvalidSeriesError(
            f"Unable to preprocess a volume of shape {volume.shape} as each axis needs at least 4 voxels")
    finite = np.isfinite(volume.hu)
    if not finite.all():
        raise InvalidSeriesError(
            f"Unable to preprocess the volume as {int((~finite).sum())} voxels are NaN or infinite")


def crop_box_mm(mask_lo_mm: np.ndarray, mask_hi_mm: np.ndarray, extent_mm: np.ndarray, margin_mm: float,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The crop box: lung box grown by ``margin_mm`` on every side, clipped to ``[0, extent_mm]``."""
    lo = np.maximum(mask_lo_mm - margin_mm, 0.0)
    hi = np.minimum(mask_hi_mm + margin_mm, extent_mm)
    return lo, hi


def preprocess_volume(volume: Volume, cfg: PreprocessConfig | None = None, *,
                      timings: dict[str, float] | None = None) -> Sample:
    """Turn a CT volume into a sample: canonical, lung-cropped, cube-resized, HU-windowed.

    Args:
        volume: HU volume in any orientation.
        cfg: preprocessing parameters; defaults to ``PreprocessConfig()``.
        timings: if given, receives the seconds spent in each stage (``mask``, ``resample``, ``finish``).

    Returns:
        A :class:`Sample` with ``image (1, S, S, S)`` float32, ``lung_mask (1, S, S, S)`` uint8 and ``qc``.

    Raises:
        InvalidSeriesError: a volume that is too small or not finite, or whose lungs are missing or
            implausible (the message says which and the volume found).

    Examples:
        >>> from lungmae_core.synthetic.phantoms import generate_phantom
        >>> from lungmae_core.synthetic.scanners import scanner_for_site
        >>> vol = generate_phantom("ggo", seed=1, scanner=scanner_for_site(2)).to_volume()
        >>> preprocess_volume(vol).image.shape
        (1, 128, 128, 128)
    """
    cfg = cfg or PreprocessConfig()
    canonical = to_canonical(volume)
    _check_input(canonical)
    hu = canonical.hu
    spacing = np.asarray(canonical.spacing_mm, dtype=np.float64)
    shape = np.asarray(hu.shape)
    clock = _Clock(timings)
    coarse = coarse_lung_mask(hu, spacing, cfg)
    clock.lap("mask")

    # Lung bounding box in input-voxel units (a coarse voxel covers its whole block), then in mm.
    lo_idx, hi_idx = np.zeros(3), np.zeros(3)
    for axis in range(3):
        present = np.flatnonzero(coarse.mask.any(axis=tuple(a for a in range(3) if a != axis)))
        f = coarse.factors[axis]
        lo_idx[axis] = present[0] * f
        hi_idx[axis] = min(present[-1] * f + f - 1, shape[axis] - 1)
    iso = float(spacing.mean())
    lo_mm, hi_mm = crop_box_mm(lo_idx * spacing, hi_idx * spacing, (shape - 1) * spacing,
                                 cfg.margin_in_mm(iso))

    # One trilinear pass: output voxel i of S sits at lo + i * (hi - lo) / (S - 1) (corners aligned).
    s = cfg.size
    steps = np.arange(s, dtype=np.float64) / (s - 1)
    coords_in = [(lo_mm[k] + steps * (hi_mm[k] - lo_mm[k])) / spacing[k] for k in range(3)]
    # Anti-aliasing: where an output voxel spans f >= 2 input voxels, average f x f x f blocks first (a box
    # prefilter that also shrinks the data the interpolation reads), then interpolate between block centres.
    factors = [max(1, int(np.floor((hi_mm[k] - lo_mm[k]) / (s - 1) / spacing[k] + 1e-6))) if cfg.antialias else 1
               for k in range(3)]
    start = [int(np.floor(c[0])) for c in coords_in]
    stop = [min(int(np.ceil(c[-1])) + f, int(n)) for c, n, f in zip(coords_in, shape, factors, strict=True)]
    roi = hu[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    if max(factors) > 1:
        roi = block_mean(roi, factors)
    cube_hu = sample_linear(roi, [(c - st - (f - 1) / 2.0) / f
                                  for c, st, f in zip(coords_in, start, factors, strict=True)])
    coords_mask = [coarse.from_input_index(c, k) for k, c in enumerate(coords_in)]
    cube_mask = sample_linear(coarse.mask.astype(np.float32), coords_mask) >= 0.5
    clock.lap("resample")

    if not cube_mask.any():  # pragma: no cover - the coarse mask passed the volume check
        raise InvalidSeriesError("Unable to preprocess the volume as its lung mask vanished after resizing")
    qc = {
        "lung_volume_ml": round(coarse.lung_volume_ml, 1),
        "lung_components": coarse.n_components,
        "spacing_mm": [round(float(v), 4) for v in spacing],
        "input_shape": [int(n) for n in shape],
        "orientation": volume.orientation,
        "crop_mm": [round(float(v), 2) for v in (hi_mm - lo_mm)],
        **_qc_stats(cube_hu, cube_mask),
    }
    image = cube_hu
    image -= np.float32(cfg.hu_min)
    image *= np.float32(1.0 / (cfg.hu_max - cfg.hu_min))
    np.clip(image, 0.0, 1.0, out=image)
    log.debug("preprocessed volume %s -> cube %d, lung %.0f mL", tuple(shape), s, coarse.lung_volume_ml)
    clock.lap("finish")
    return Sample(image=image[None], lung_mask=cube_mask.astype(np.uint8)[None], qc=qc)



def _qc_stats(cube_hu: np.ndarray, cube_mask: np.ndarray) -> dict[str, float]:
    lung_hu = cube_hu[cube_mask]
    p05, p50, p95 = (float(v) for v in np.percentile(lung_hu, [5, 50, 95]))
    return {"hu_mean": round(float(lung_hu.mean()), 2), "hu_std": round(float(lung_hu.std()), 2),
            "hu_p05": round(p05, 2), "hu_p50": round(p50, 2), "hu_p95": round(p95, 2)}


def reference_preprocess(volume: Volume, cfg: PreprocessConfig | None = None, *,
                         timings: dict[str, float] | None = None) -> Sample:
    """The authors' order of operations, kept as the reference our fast path is measured against.

    Cubic ``scipy.ndimage.zoom`` of the whole volume to isotropic voxels (mean spacing), the lung mask at
    that full resolution, crop to the lung box with the margin (``margin_in_mm`` in isotropic voxels), then a trilinear
    ``zoom`` of the crop (and of the mask, re-thresholded at 0.5) to the cube. Slow and memory-hungry on a
    512x512x300 series; used by ``benchmarks/prepare.py`` and the tests, not by the pipeline. ``timings``
    receives seconds per stage (``isotropic``, ``mask``, ``resample``).

    Raises:
        InvalidSeriesError: as :func:`preprocess_volume`.
    """
    cfg = cfg or PreprocessConfig()
    canonical = to_canonical(volume)
    _check_input(canonical)
    spacing = np.asarray(canonical.spacing_mm, dtype=np.float64)
    iso = float(spacing.mean())
    clock = _Clock(timings)
    iso_hu = ndimage.zoom(canonical.hu, spacing / iso, order=3, mode="nearest", prefilter=True)
    clock.lap("isotropic")
    full_cfg = dataclasses.replace(cfg, mask_spacing_mm=0.0)
    coarse = coarse_lung_mask(iso_hu, (iso, iso, iso), full_cfg)
    clock.lap("mask")
    box = []
    for axis in range(3):
        present = np.flatnonzero(coarse.mask.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(round(cfg.margin_in_mm(iso) / iso))
        lo = max(int(present[0]) - margin, 0)
        hi = min(int(present[-1]) + margin, iso_hu.shape[axis] - 1)
        box.append(slice(lo, hi + 1))
    crop = iso_hu[tuple(box)]
    crop_mask = coarse.mask[tuple(box)].astype(np.float32)
    del iso_hu
    zoom = [cfg.size / n for n in crop.shape]  # output shape round(n * zoom) = size; corners aligned
    cube_hu = ndimage.zoom(crop, zoom, order=1, output=np.float32, grid_mode=False)
    cube_mask = ndimage.zoom(crop_mask, zoom, order=1, output=np.float32, grid_mode=False) >= 0.5
    assert cube_hu.shape == (cfg.size,) * 3, cube_hu.shape
    clock.lap("resample")
    qc = {"lung_volume_ml": round(coarse.lung_volume_ml, 1), "spacing_mm": [round(float(v), 4) for v in spacing],
          "input_shape": list(canonical.shape), **_qc_stats(cube_hu, cube_mask)}
    image = np.clip((cube_hu - np.float32(cfg.hu_min)) / np.float32(cfg.hu_max - cfg.hu_min), 0.0, 1.0)
    return Sample(image=image.astype(np.float32)[None], lung_mask=cube_mask.astype(np.uint8)[None], qc=qc)
