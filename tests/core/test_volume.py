"""Volume, canonical reorientation (LPS, axes (D, H, W) -> (+S, +P, +L)) and separable trilinear sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from lungmae_core.errors import InvalidSeriesError
from lungmae_core.volume import Volume, canonical_affine, orientation_code, sample_linear, to_canonical


def _reoriented(hu: np.ndarray, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """Store a canonical volume in another axis order/direction, with the affine that keeps positions."""
    out = np.transpose(hu, perm)
    aff = affine.copy()
    aff[:3, :3] = affine[:3, list(perm)]
    for k, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=k)
            aff[:3, 3] += aff[:3, k] * (out.shape[k] - 1)
            aff[:3, k] = -aff[:3, k]
    return Volume(np.ascontiguousarray(out), aff)


ORIENTATIONS = [(perm, flips) for perm in itertools.permutations(range(3))
                for flips in [(False, False, False), (True, False, True), (False, True, False), (True, True, True)]]


@pytest.mark.parametrize("perm,flips", ORIENTATIONS)
def test_to_canonical_recovers_array_and_positions(perm, flips):
    rng = np.random.default_rng(0)
    hu = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = canonical_affine((2.5, 0.7, 0.8), origin_mm=(-100.0, -50.0, 30.0))
    stored = _reoriented(hu, affine, perm, flips)
    back = to_canonical(stored)
    np.testing.assert_array_equal(back.hu, hu)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)
    assert back.orientation == "SPL"
    assert back.spacing_mm == pytest.approx((2.5, 0.7, 0.8))


def test_every_voxel_keeps_its_patient_position():
    hu = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = canonical_affine((3.0, 1.0, 2.0), origin_mm=(10.0, 20.0, 30.0))
    stored = _reoriented(hu, affine, (2, 0, 1), (True, False, True))
    back = to_canonical(stored)
    for idx in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        value = back.hu[idx]
        src = np.argwhere(stored.hu == value)[0]
        world_src = stored.affine @ np.append(src, 1.0)
        world_back = back.affine @ np.append(idx, 1.0)
        np.testing.assert_allclose(world_src, world_back)


def test_feet_first_series_orientation_code():
    # A feet-first series in file order: slices run superior -> inferior, columns patient left -> right.
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = -2.5, 0.7, -0.7, 1.0
    vol = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), affine)
    assert vol.orientation == orientation_code(affine) == "IPR"
    canon = to_canonical(vol)
    assert canon.orientation == "SPL"
    assert canon.shape == (3, 4, 5)
    np.testing.assert_array_equal(canon.hu, vol.hu[::-1, :, ::-1])


@pytest.mark.parametrize("hu,affine,message", [
    (np.zeros((4, 4), np.float32), np.eye(4), "has 2 dimensions"),
    (np.zeros((2, 3, 4), np.float32), np.eye(3), "affine has shape (3, 3)"),
    (np.zeros((2, 3, 4), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]), "not finite and invertible"),
    (np.zeros((2, 3, 4), np.float32), np.full((4, 4), np.nan), "not finite and invertible"),
])
def test_bad_volume_is_rejected_with_reason(hu, affine, message):
    with pytest.raises(InvalidSeriesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Volume(hu, affine)


def test_two_axes_along_one_patient_axis_cannot_be_reoriented():
    affine = np.eye(4)
    affine[:3, 1] = [1.0, 0.1, 0.0]  # both D and H point mostly along x
    with pytest.raises(InvalidSeriesError, match="two of its axes point along the same patient axis"):
        to_canonical(Volume(np.zeros((2, 2, 2), np.float32), affine))


def test_negative_spacing_is_rejected():
    with pytest.raises(InvalidSeriesError, match="must be positive"):
        canonical_affine((1.0, -1.0, 1.0))


@pytest.mark.parametrize("out_shape", [(7, 5, 9), (3, 11, 4), (1, 1, 1)])
def test_sample_linear_matches_map_coordinates(out_shape):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 8, 10)).astype(np.float32)
    coords = [np.sort(rng.uniform(0, n - 1, m)) for n, m in zip(a.shape, out_shape, strict=True)]
    grid = np.meshgrid(*coords, indexing="ij")
    expected = ndimage.map_coordinates(a.astype(np.float64), grid, order=1, mode="nearest")
    np.testing.assert_allclose(sample_linear(a, coords), expected, rtol=1e-5, atol=1e-5)


def test_sample_linear_identity_and_clamping():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    same = sample_linear(a, [np.arange(n, dtype=float) for n in a.shape])
    np.testing.assert_array_equal(same, a)
    clamped = sample_linear(a, [np.array([-3.0]), np.array([10.0]), np.array([0.0])])
    assert clamped.item() == a[0, 2, 0]
