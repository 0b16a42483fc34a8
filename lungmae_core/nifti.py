"""Read a NIfTI CT volume (``.nii`` / ``.nii.gz``) into the same :class:`Volume` the DICOM reader makes.

Public CT collections (MosMed, COVID-19 challenge sets) are often shared as NIfTI. NIfTI's world space is
RAS; ours is DICOM LPS, so the affine's first two rows change sign. The scaling (``scl_slope``/``scl_inter``)
is applied by nibabel; the values must then be Hounsfield units, which is checked on air (a CT volume has
air near -1000 HU around and inside the patient).
"""

from __future__ import annotations

import os

import numpy as np

from lungmae_core.dicom import SeriesRejected
from lungmae_core.volume import Volume, to_canonical

__all__ = ["load_nifti", "RAS_TO_LPS"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AIR_PERCENTILE = 1.0
_AIR_MAX_HU = -500.0  # the 1st percentile of a chest CT in HU is air, far below this


def load_nifti(path: str | os.PathLike[str]) -> Volume:
    """Load a 3D NIfTI CT in HU as a canonical LPS :class:`Volume`.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``Volume`` with ``hu: (D, H, W)`` float32 in canonical orientation (``to_canonical``), affine in LPS mm
        (sform when set, else qform, as nibabel chooses).

    Raises:
        SeriesRejected: code ``nifti-invalid`` when the file cannot be read, is not 3D (a trailing axis of
            length 1 is allowed), has non-finite values, or does not look like HU; messages hold no path.
    """
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        image = nib.load(os.fspath(path))
        if not isinstance(image, SpatialImage):
            raise TypeError(f"a {type(image).__name__} has no voxel grid")
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise SeriesRejected("nifti-invalid", f"the NIfTI file cannot be read ({type(exc).__name__}); check that "
                                              "it is a complete .nii/.nii.gz file") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SeriesRejected("nifti-invalid", f"the NIfTI image has shape {data.shape}; expected one 3D volume")
    if not np.all(np.isfinite(data)):
        raise SeriesRejected("nifti-invalid", "the NIfTI image has NaN or infinite values")
    air = float(np.percentile(data, _AIR_PERCENTILE))
    if air > _AIR_MAX_HU:
        raise SeriesRejected(
            "nifti-invalid", f"its values do not look like Hounsfield units: the {_AIR_PERCENTILE:g}st percentile "
                             f"is {air:.0f}, but air should be near -1000 HU (was an offset such as +1024 "
                             "left in, or is this not CT?)")
    affine = RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)
    return to_canonical(Volume(data, affine))
