"""NIfTI input: RAS -> LPS, canonical orientation, HU checks, clear reasons for bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lungmae_core.dicom import SeriesRejected
from lungmae_core.nifti import load_nifti
from tests.dicom_factory import tiny_hu


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_ras_volume_comes_back_canonical_lps(tmp_path: Path) -> None:
    hu = tiny_hu(depth=6, size=10)  # canonical (D, H, W) = (+S, +P, +L)
    # Stored as (i, j, k) = (W, H, D): i toward the patient's left (-x in RAS), j posterior (-y), k superior.
    data = np.transpose(hu, (2, 1, 0))  # (W, H, D)
    affine_ras = np.diag([-0.7, -0.8, 2.5, 1.0])  # i: toward L (-x in RAS), j: toward P (-y in RAS), k: S
    affine_ras[:3, 3] = (10.0, 20.0, -50.0)
    volume = load_nifti(_save(tmp_path / "p001.nii.gz", data, affine_ras))
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.orientation == "SPL"
    assert volume.spacing_mm == pytest.approx((2.5, 0.8, 0.7))
    # voxel [0, 0, 0] is at RAS (10, 20, -50) = LPS (-10, -20, -50)
    np.testing.assert_allclose(volume.affine[:3, 3], (-10.0, -20.0, -50.0))


def test_radiological_ras_storage_is_flipped_to_canonical(tmp_path: Path) -> None:
    hu = tiny_hu(depth=5, size=8)
    data = np.transpose(hu, (2, 1, 0))[::-1, ::-1, :]  # i toward R, j toward A (plain RAS+)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    volume = load_nifti(_save(tmp_path / "a.nii", np.ascontiguousarray(data), affine))
    np.testing.assert_array_equal(volume.hu, hu)


@pytest.mark.parametrize("make,fragment", [
    (lambda p: _save(p, np.zeros((4, 4, 4, 2), np.float32) - 1000, np.eye(4)), "shape (4, 4, 4, 2); expected one 3D"),
    (lambda p: _save(p, tiny_hu() + 1024, np.eye(4)), "do not look like Hounsfield units"),
    (lambda p: _save(p, np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), "NaN or infinite"),
    (lambda p: p.write_bytes(b"\x1f\x8b not really gzip") or p, "cannot be read"),
])
def test_bad_nifti_rejected_with_reason(tmp_path: Path, make, fragment) -> None:
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(SeriesRejected) as err:
        load_nifti(path)
    assert err.value.code == "nifti-invalid" and fragment in str(err.value)
    assert str(tmp_path) not in str(err.value)
