"""The classical lung mask finds the phantoms' lungs (Dice > 0.95) and rejects implausible scans with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from lungmae_core.config import PreprocessConfig
from lungmae_core.errors import InvalidSeriesError
from lungmae_core.lungmask import block_mean, coarse_lung_mask, lung_mask_from_hu
from lungmae_core.synthetic.phantoms import generate_phantom
from lungmae_core.synthetic.scanners import scanner_for_site

SHAPE = (64, 112, 112)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("label,site,severity", [
    ("normal", 0, None), ("normal", 3, None),
    ("ggo", 1, 0.9), ("ggo", 2, 0.5),
    ("fibrosis", 2, 1.0), ("fibrosis", 3, 0.6),
    ("emphysema", 0, 1.0), ("emphysema", 1, 0.4),
])
def test_mask_matches_phantom_truth(label, site, severity):
    p = generate_phantom(label, seed=20 + site, scanner=scanner_for_site(site), severity=severity, shape=SHAPE)
    mask = lung_mask_from_hu(p.hu, p.spacing_mm, PreprocessConfig())
    assert mask.dtype == np.uint8 and mask.shape == p.hu.shape
    assert dice(mask, p.lung_mask) > 0.95


def test_coarse_mask_at_full_resolution_phantom():
    """A 1 mm-ish series takes the coarse path (block factors > 1) and still matches the truth."""
    p = generate_phantom("fibrosis", seed=5, scanner=scanner_for_site(0), severity=0.7, shape=(100, 192, 192))
    cfg = PreprocessConfig(mask_spacing_mm=4.0)
    coarse = coarse_lung_mask(p.hu, p.spacing_mm, cfg)
    assert coarse.factors == (1, 2, 2)
    assert coarse.lung_volume_ml == pytest.approx(p.lung_volume_ml, rel=0.05)
    assert dice(lung_mask_from_hu(p.hu, p.spacing_mm, cfg), p.lung_mask) > 0.95


def test_stomach_gas_is_not_lung():
    for seed in range(40):
        p = generate_phantom("normal", seed=seed, shape=SHAPE)
        zs = np.flatnonzero(p.lung_mask.any(axis=(1, 2)))
        below = p.hu[: zs[0]]
        if (below < -900).sum() > 50:  # a gas bubble under the diaphragm is in view
            break
    else:
        pytest.fail("no phantom with a stomach bubble in 40 seeds")
    mask = lung_mask_from_hu(p.hu, p.spacing_mm)
    assert mask[: zs[0]].sum() < 0.002 * mask.sum()


def _lungs_removed(p):
    hu = p.hu.copy()
    rng = np.random.default_rng(0)
    hu[p.lung_mask > 0] = 40.0 + rng.normal(0, 20, int(p.lung_mask.sum()))
    return hu


def _abdomen(p):
    zs = np.flatnonzero(p.lung_mask.any(axis=(1, 2)))
    return p.hu[: max(zs[0] - 1, 8)]


def _lung_bases(p):
    """An upper-abdomen scan that catches only the lung bases."""
    zs = np.flatnonzero(p.lung_mask.any(axis=(1, 2)))
    return p.hu[: zs[0] + 4]


def _head(p):
    """A head-like volume: brain (30 HU) in a bone shell, air around it, small air-filled sinuses."""
    d, h, w = 40, 96, 96
    z, y, x = np.ogrid[:d, :h, :w]
    r = np.sqrt(((z - 20) / 18.0) ** 2 + ((y - 48) / 40.0) ** 2 + ((x - 48) / 32.0) ** 2)
    hu = np.full((d, h, w), -1000.0, np.float32)
    hu[r < 1.0] = 700.0
    hu[r < 0.9] = 30.0
    hu[(z > 14) & (z < 20) & (y > 14) & (y < 22) & (np.abs(x - 48) < 10)] = -950.0  # sinuses
    return hu + np.random.default_rng(1).normal(0, 10, hu.shape).astype(np.float32)


@pytest.mark.parametrize("make,message", [
    (_head, "Unable to find lungs as no air region inside the body reaches 80 mL"),
    (_lungs_removed, "mL is below the minimum of 500 mL (not a chest CT"),  # only the trachea is left
    (_abdomen, "Unable to find lungs"),
    (lambda p: np.full((20, 40, 40), -1000.0, np.float32), "Unable to find a body as no voxel is above -500 HU"),
    (_lung_bases, "mL is below the minimum of 500 mL"),
])
def test_implausible_scans_are_rejected_with_the_reason(make, message):
    p = generate_phantom("normal", seed=3, shape=SHAPE)
    with pytest.raises(InvalidSeriesError) as exc:
        lung_mask_from_hu(make(p), p.spacing_mm, PreprocessConfig())
    assert message in str(exc.value)


def test_too_much_lung_is_rejected():
    p = generate_phantom("emphysema", seed=3, shape=SHAPE)
    with pytest.raises(InvalidSeriesError, match=r"lung volume \d+ mL is above the maximum of 1000 mL"):
        lung_mask_from_hu(p.hu, p.spacing_mm, PreprocessConfig(min_lung_ml=100, max_lung_ml=1000))


def test_block_mean_averages_whole_blocks_and_drops_partial_ones():
    a = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    out = block_mean(a, (2, 2, 3))
    assert out.shape == (2, 2, 1) and out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx(a[:2, :2, :].mean())
    assert out[1, 1, 0] == pytest.approx(a[2:4, 2:4, :].mean())
    np.testing.assert_array_equal(block_mean(a, (1, 1, 1)), a)
    assert block_mean(a, (9, 1, 1)).shape == (1, 4, 3)  # factor larger than the axis: one block


def test_one_voxel_diagonal_wall_still_encloses_the_lungs():
    """A chest wall that is one voxel thick and runs diagonally (a staircase touching only at corners) must
    still enclose the lungs: the per-slice background is 4-connected, as in binary_fill_holes."""
    y, x = np.ogrid[-48:48, -48:48]
    diamond = np.abs(x) + np.abs(y)
    slice_hu = np.full((96, 96), -1000.0, np.float32)
    slice_hu[diamond <= 30] = 40.0                      # body: the wall is the single diagonal ring |x|+|y| = 30
    lungs = (diamond <= 29) & (np.abs(x) > 3)
    slice_hu[lungs] = -850.0
    hu = np.repeat(slice_hu[None], 30, axis=0)
    mask = lung_mask_from_hu(hu, (4.0, 3.0, 3.0), PreprocessConfig(closing_mm=0.0))
    expected = np.repeat(lungs[None], 30, axis=0)
    assert dice(mask, expected) > 0.99
