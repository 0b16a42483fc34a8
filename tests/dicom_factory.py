"""Small real DICOM series for the site-data tests, written with pydicom through our synthetic writer.

Each helper writes real files that the reader then indexes from disk; bad-input cases edit those files with
pydicom (delete an element, change a value, cut the file short) exactly as a broken export would look.
"""

from __future__ import annotations

import dataclasses
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom

from lungmae_core.synthetic.dicom_writer import SyntheticStudy, write_ct_series
from lungmae_core.synthetic.scanners import ScannerProfile

SCANNER = ScannerProfile(name="test-sharp", manufacturer="TESTCO", model="Tiny CT", slice_thickness_mm=2.5)


def study(patient: str = "PAT-1", index: int = 0) -> SyntheticStudy:
    """Identifiers of one fake study."""
    tag = f"{index}{zlib.crc32(patient.encode()) % 10**6}"
    return SyntheticStudy(patient_id=patient, patient_name=f"DOE^{patient}", birth_date="19600101", sex="F",
                          study_uid=f"1.2.826.0.1.3680043.8.498.9{tag}", accession_number=f"ACC{index}{patient}",
                          study_id=str(index + 1), study_date="20240101",
                          frame_of_reference_uid=f"1.2.826.0.1.3680043.8.498.8{tag}")


def tiny_hu(depth: int = 8, size: int = 16, seed: int = 0) -> np.ndarray:
    """An integer-valued HU volume ``(depth, size, size)`` with structure on every axis (exact round trips)."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")
    hu = -1000 + 40 * d + 7 * h + 3 * w + rng.integers(0, 5, size=d.shape)
    return hu.astype(np.float32)


def write_series(folder: Path, hu: np.ndarray | None = None, spacing: Sequence[float] = (2.5, 0.7, 0.7), *,
                 position: str = "HFS", patient: str = "PAT-1", study_index: int = 0, series_number: int = 2,
                 signed: bool | None = None, series_uid: str | None = None,
                 origin: Sequence[float] = (-5.0, -5.0, -100.0)) -> list[Path]:
    """Write ``hu`` (default :func:`tiny_hu`) as a CT series in ``folder``; returns the files."""
    hu = tiny_hu() if hu is None else hu
    scanner = dataclasses.replace(SCANNER, patient_position=position)
    return write_ct_series(hu, spacing, folder, study=study(patient, study_index), scanner=scanner,
                           series_number=series_number, signed=signed, series_uid=series_uid, origin_mm=origin,
                           file_prefix=f"S{series_number}_")


def edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    """Rewrite one DICOM file after ``change(ds)``."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _seq(**values) -> pydicom.Sequence:
    """A one-item DICOM sequence holding ``values`` (keyword -> value)."""
    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return pydicom.Sequence([item])


def write_enhanced(folder: Path, hu: np.ndarray | None = None, spacing: Sequence[float] = (2.5, 0.7, 0.7), *,
                   frame_order: Sequence[int] | None = None, per_frame_rescale: bool = False,
                   origin: Sequence[float] = (-5.0, -5.0, -100.0)) -> Path:
    """Write ``hu`` as one Enhanced CT Image Storage object (all slices as frames of one file).

    Geometry lives where the standard puts it: pixel measures, orientation and (by default) rescale in the
    Shared Functional Groups, one Plane Position per frame in the Per-Frame Functional Groups. ``frame_order``
    stores slices in another order (the reader must sort by position); ``per_frame_rescale`` gives every frame
    its own intercept (and stored values shifted to match).
    """
    hu = tiny_hu() if hu is None else hu
    depth = hu.shape[0]
    frame_order = list(range(depth)) if frame_order is None else list(frame_order)
    first = write_series(folder / "classic", hu[:1], spacing, origin=origin)[0]  # the common header
    ds = pydicom.dcmread(first)
    shutil.rmtree(folder / "classic")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleIntercept", "RescaleSlope", "RescaleType", "SliceLocation", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.NumberOfFrames = depth
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = _seq(PixelSpacing=[spacing[1], spacing[2]], SliceThickness=spacing[0])
    shared.PlaneOrientationSequence = _seq(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = _seq(RescaleIntercept=0, RescaleSlope=1, RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    per_frame, frames = [], []
    for k, d in enumerate(frame_order):
        offset = 10 * k if per_frame_rescale else 0
        group = pydicom.Dataset()
        group.PlanePositionSequence = _seq(ImagePositionPatient=[origin[0], origin[1], origin[2] + d * spacing[0]])
        if per_frame_rescale:
            group.PixelValueTransformationSequence = _seq(RescaleIntercept=-offset, RescaleSlope=1, RescaleType="HU")
        per_frame.append(group)
        frames.append((np.rint(hu[d]) + offset).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(per_frame)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    ds.PixelData = np.stack(frames).tobytes()
    path = folder / "enhanced.dcm"
    ds.save_as(path)
    return path
