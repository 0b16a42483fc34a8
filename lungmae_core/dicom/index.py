"""Step 1 of DICOM intake: read the headers only of every file in a tree and group them into series.

Pixel data is never loaded here; enhanced (multi-frame) CT is expanded into one header per frame from
its functional groups. See :mod:`lungmae_core.dicom` for the whole path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungmae_core.errors import InvalidSeriesError

if TYPE_CHECKING:  # pydicom is imported where files are read
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_MULTIFRAME_CT = {ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE}
_CT_IMAGE_CLASSES = {CT_IMAGE_STORAGE} | _MULTIFRAME_CT
_SCOUT_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW"}
_PARALLEL_MIN_FILES = 512  # below this, starting worker processes costs more than it saves
_DUPLICATE_MM = 0.01  # two slice positions closer than this along the normal are "the same position"


@dataclasses.dataclass(frozen=True)
class InstanceHeader:
    """What the index keeps of one DICOM instance (plain values, cheap to pickle to worker processes).

    Identifiers (UIDs, PatientID, AccessionNumber) are kept here, at the site, to group and pseudonymise;
    they never go into messages.
    """

    path: str
    file_size: int
    mtime_ns: int
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    accession_number: str
    modality: str
    image_type: tuple[str, ...]
    transfer_syntax: str
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    slice_thickness: float | None
    manufacturer: str
    has_pixel_data: bool
    pixel_data_truncated: bool
    number_of_frames: int
    samples_per_pixel: int
    has_rescale: bool
    instance_number: int | None
    frame: int | None = None
    rescale: tuple[float, float] | None = None
    frames: tuple[FrameGeometry, ...] = ()

    @property
    def identity(self) -> tuple[str, int]:
        """Which image this is: SOP Instance UID and frame (two copies of one file share it)."""
        return (self.sop_instance_uid, -1 if self.frame is None else self.frame)


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
    """One frame of an Enhanced (multi-frame) CT object, from its functional groups (PS3.3 C.7.6.16).

    Args:
        position: (0020,0032) from the (0020,9113) Plane Position Sequence.
        orientation: (0020,0037) from the (0020,9116) Plane Orientation Sequence.
        pixel_spacing: (0028,0030) from the (0028,9110) Pixel Measures Sequence.
        slice_thickness: (0018,0050) from the same.
        rescale: (slope, intercept) from the (0028,9145) Pixel Value Transformation Sequence.
        frame_type: (0008,9007) Frame Type from the (0018,9329) CT Image Frame Type Sequence.
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rescale: tuple[float, float] | None
    frame_type: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file (or empty folder) that holds no usable instance, with the reason."""

    path: str
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """All instances sharing one Series Instance UID (in path order; geometry decides the slice order)."""

    series_uid: str
    instances: tuple[InstanceHeader, ...]

    @property
    def study_uid(self) -> str:
        return self.instances[0].study_uid

    @property
    def patient_id(self) -> str:
        return self.instances[0].patient_id

    @property
    def accession_number(self) -> str:
        return self.instances[0].accession_number

    @property
    def manufacturer(self) -> str:
        return self.instances[0].manufacturer

    def fingerprint(self) -> str:
        """A digest of what this series is made of, for the cache key.

        It hashes each instance's SOP Instance UID, file size and modification time (sorted), not the pixel
        data: hashing pixels would read every file in full on every rerun, costing as much as preparing
        again, while a re-export or an edited file changes its size or mtime. Touching files therefore
        redoes the work (safe); the identifiers only enter a one-way SHA-256.
        """
        import hashlib

        digest = hashlib.sha256()
        for inst in sorted(self.instances, key=lambda i: (i.identity, i.path)):
            digest.update(f"{inst.sop_instance_uid}|{inst.frame}|{inst.file_size}|{inst.mtime_ns}\n".encode())
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class DicomIndex:
    """The result of walking an input tree."""

    series: tuple[DicomSeries, ...]
    nifti: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]


# --------------------------------------------------------------------------------------------- indexing

@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's warnings out of the site's logs: they quote element values (UIDs, names).

    pydicom reports invalid values at WARNING level and as Python warnings, e.g. "Invalid value for VR UI:
    '1.2.3...'". Inside this block both are muted and repeated here at DEBUG only (debug logs may hold
    identifiers; INFO and above must not).
    """
    pd_logger = logging.getLogger("pydicom")
    level = pd_logger.level
    pd_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            logger.debug("pydicom: %s", warning.message)
    finally:
        pd_logger.setLevel(level)


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name says NIfTI (``.nii`` or ``.nii.gz``)."""
    name = os.fspath(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a multi-valued DICOM element (any value representation), else None."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _xyz(value: Any) -> tuple[float, float, float] | None:
    out = _floats(value, 3)
    return None if out is None else (out[0], out[1], out[2])


def _pair(value: Any) -> tuple[float, float] | None:
    out = _floats(value, 2)
    return None if out is None else (out[0], out[1])


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _pixel_data_truncated(ds: Dataset, transfer_syntax: str, frames: int, file_size: int) -> bool:
    """Whether (7FE0,0010) is shorter than its declared length, or than Rows x Columns x ... for native data."""
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import UID

    item = ds.get_item("PixelData")
    if isinstance(item, RawDataElement):  # deferred: value not read, only its length and file offset
        length = item.length
        if length == 0xFFFFFFFF:  # encapsulated: checked when decoding
            return False
        if item.value_tell is not None and item.value_tell + length > file_size:
            return True
    else:
        value = item.value
        length = len(value) if isinstance(value, (bytes, bytearray)) else 0
    if transfer_syntax and UID(transfer_syntax).is_compressed:
        return False
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
                    * int(ds.BitsAllocated) // 8)
    except (AttributeError, TypeError, ValueError):
        return False
    return length < expected


def read_header(path: str | os.PathLike[str]) -> InstanceHeader | SkippedFile:
    """Read one file's DICOM header without its pixel data.

    Pixel Data is deferred, not loaded: its declared length and file offset tell whether the file was cut
    short, so truncated files are found at indexing time.

    Args:
        path: any file.

    Returns:
        An :class:`InstanceHeader`, or a :class:`SkippedFile` with a code and reason for files that are not
        DICOM, unreadable, truncated inside the header, or DICOM objects without an image series.
    """
    with _quiet_pydicom():
        return _read_header(os.fspath(path))


def _read_header(path: str) -> InstanceHeader | SkippedFile:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        stat = os.stat(path)
        ds = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        return SkippedFile(path, "not-dicom", "it is not a DICOM file (no 'DICM' prefix after the 128-byte "
                                              "preamble); remove it or ignore this line")
    except PermissionError as exc:
        return SkippedFile(path, "unreadable", f"it cannot be read ({exc.strerror}); check the file permissions")
    except OSError as exc:
        return SkippedFile(path, "unreadable", f"it cannot be read ({exc.strerror or type(exc).__name__})")
    except Exception as exc:  # pydicom raises many types on corrupt headers (struct.error, EOFError, ...)
        return SkippedFile(path, "truncated", f"its DICOM header is truncated or corrupt ({type(exc).__name__}); "
                                              "re-export the file")
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return SkippedFile(path, "not-an-image", "it is a DICOMDIR index file, not an image")
    missing = [f"({tag}) '{kw}'" for tag, kw in (("0020,000E", "Series Instance UID"),
                                                   ("0008,0018", "SOP Instance UID"))
               if not ds.get(kw.replace(" ", ""))]
    if missing:
        return SkippedFile(path, "truncated", f"its header has no {' or '.join(missing)}; the file is "
                                              "truncated or not a complete DICOM instance")
    has_pixels = "PixelData" in ds
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    truncated = has_pixels and _pixel_data_truncated(ds, transfer_syntax, frames, stat.st_size)
    instance_number = ds.get("InstanceNumber")
    multiframe = sop_class in _MULTIFRAME_CT or frames > 1
    return InstanceHeader(
        frames=_frame_geometry(ds, frames) if multiframe else (),
        path=path,
        file_size=int(stat.st_size),
        mtime_ns=int(stat.st_mtime_ns),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=sop_class,
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        transfer_syntax=transfer_syntax,
        rows=int(ds.Rows) if ds.get("Rows") is not None else None,
        columns=int(ds.Columns) if ds.get("Columns") is not None else None,
        pixel_spacing=_pair(ds.get("PixelSpacing")),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_xyz(ds.get("ImagePositionPatient")),
        slice_thickness=_float(ds.get("SliceThickness")),
        manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
        has_pixel_data=has_pixels,
        pixel_data_truncated=truncated,
        number_of_frames=frames,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        has_rescale=ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None,
        instance_number=int(instance_number) if instance_number not in (None, "") else None,
    )


def _functional(item: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """``keyword`` from the per-frame functional group ``item``, else from the shared one, else None."""
    for group in (item, shared):
        if group is None:
            continue
        seq = group.get(sequence)
        if seq:
            value = seq[0].get(keyword)
            if value is not None:
                return value
    return None


def _frame_geometry(ds: Dataset, n_frames: int) -> tuple[FrameGeometry, ...]:
    """Per-frame geometry and rescale of an Enhanced CT object (empty when it has no functional groups)."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if shared is None and not per_frame:
        return ()
    top_rescale = (_float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept")))
    out: list[FrameGeometry] = []
    for k in range(n_frames):
        item = per_frame[k] if k < len(per_frame) else None
        slope = _float(_functional(item, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(_functional(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
        if slope is None or intercept is None:
            slope, intercept = top_rescale
        frame_type = _functional(item, shared, "CTImageFrameTypeSequence", "FrameType") or ()
        out.append(FrameGeometry(
            position=_xyz(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient")),
            orientation=_floats(_functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_pair(_functional(item, shared, "PixelMeasuresSequence", "PixelSpacing")),
            slice_thickness=_float(_functional(item, shared, "PixelMeasuresSequence", "SliceThickness")),
            rescale=(slope, intercept) if slope is not None and intercept is not None else None,
            frame_type=tuple(str(t).upper() for t in frame_type),
        ))
    return tuple(out)


def expand_frames(header: InstanceHeader) -> list[InstanceHeader]:
    """One header per frame of an Enhanced CT object (a single-frame header is returned as is).

    Each frame becomes an image with its own position, orientation, spacing and rescale, so the same checks
    and the same geometry-based assembly apply to classic and enhanced series alike.
    """
    if not header.frames:
        return [header]
    return [dataclasses.replace(header, frame=k, frames=(), position=f.position, orientation=f.orientation,
                                pixel_spacing=f.pixel_spacing, slice_thickness=f.slice_thickness, rescale=f.rescale,
                                has_rescale=f.rescale is not None, image_type=header.image_type + f.frame_type)
            for k, f in enumerate(header.frames)]


def _walk(root: Path) -> Iterator[tuple[str, list[str], bool]]:
    """Yield ``(folder, files, empty)`` in a stable order; ``empty`` means no files in the whole subtree."""
    has_files: dict[str, bool] = {}
    entries = []
    for folder, dirs, files in os.walk(root, onerror=None):
        dirs.sort()
        entries.append((folder, sorted(files), dirs))
    for folder, files, dirs in reversed(entries):  # children before parents
        has_files[folder] = bool(files) or any(has_files.get(os.path.join(folder, d), False) for d in dirs)
    for folder, files, _dirs in entries:
        yield folder, files, not has_files[folder]


def index_tree(root: str | os.PathLike[str], *, progress: bool = False, workers: int = 1) -> DicomIndex:
    """Walk ``root`` and index every file from its header.

    Args:
        root: the input folder (nested folders, any file names).
        progress: show a tqdm bar while reading headers.
        workers: processes reading headers; worth it for large exports (reading is about 1 ms per file).
            Defaults to 1.

    Returns:
        The series (grouped by Series Instance UID), the NIfTI files, and every skipped file or empty
        folder with its reason.

    Raises:
        InvalidSeriesError: if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidSeriesError(f"Unable to index {root} as it is not a folder; pass the DICOM export folder")
    paths: list[str] = []
    nifti: list[str] = []
    skipped: list[SkippedFile] = []
    for folder, files, empty in _walk(root):
        if empty and Path(folder) != root and not any(s.path == folder for s in skipped):
            parent_empty = any(folder.startswith(s.path + os.sep) for s in skipped if s.code == "empty-folder")
            if not parent_empty:
                skipped.append(SkippedFile(folder, "empty-folder", "the folder holds no files; was the export "
                                                                   "interrupted?"))
        for name in files:
            full = os.path.join(folder, name)
            (nifti if is_nifti_path(name) else paths).append(full)
    headers: list[InstanceHeader] = []
    parallel = workers > 1 and len(paths) >= _PARALLEL_MIN_FILES
    pool = None
    if parallel:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers)
    try:
        results: Iterable[InstanceHeader | SkippedFile] = (
            pool.map(read_header, paths, chunksize=64) if pool is not None else map(read_header, paths))
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(paths), desc="Reading DICOM headers", unit="file")
        for result in results:
            (skipped if isinstance(result, SkippedFile) else headers).append(result)  # type: ignore[arg-type]
    finally:
        if pool is not None:
            pool.shutdown()
    return DicomIndex(series=group_series(headers), nifti=tuple(nifti), skipped=tuple(skipped))


def group_series(headers: Iterable[InstanceHeader]) -> tuple[DicomSeries, ...]:
    """Group instances by Series Instance UID (Enhanced CT frames expanded); series ordered by UID."""
    groups: dict[str, list[InstanceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid].extend(expand_frames(header))
    return tuple(DicomSeries(uid, tuple(sorted(groups[uid], key=lambda h: (h.path, h.identity))))
                 for uid in sorted(groups))
