"""Index a DICOM tree from headers, choose the CT series worth training on and build volumes from geometry.

A hospital export is a folder tree of files with arbitrary names: several patients, studies and series,
scouts, dose screens, structured reports, DICOMDIR files and the odd text file. This module

1. reads the *headers only* of every file (:func:`read_header`, pixel data is never loaded) and groups the
   instances by (0020,000E) 'Series Instance UID' (:func:`index_tree`);
2. decides whether a series can become a chest CT volume (:func:`plan_series`): CT Image Storage (or
   Enhanced CT, whose frames are expanded from the functional groups into one image each), not a scout,
   pixel data present, intact and decodable, complete Image Plane module, one consistent geometry, axial,
   not tilted, enough slices, and a slice spacing that is uniform or can safely be made uniform;
3. picks one series per study (:func:`choose_per_study`, rule: thinnest slice spacing, then most slices,
   then most pixels per slice, then the smallest Series Instance UID so that reruns agree);
4. assembles the volume from geometry, never from file order (:func:`load_series`): slices sorted by
   (0020,0032) 'Image Position (Patient)' projected on the slice normal from (0020,0037) 'Image
   Orientation (Patient)', spacing from the positions, HU from each slice's own Rescale Slope/Intercept.

Every refusal raises :class:`SeriesRejected`, an :class:`~lungmae_core.errors.InvalidSeriesError` with a
short ``code`` (for counting in the data card) and a message in pydicom's "as <cause>" style that names
DICOM elements by tag and keyword and says how to fix it. Messages never hold UIDs, names or paths: the
caller prefixes them with the series' index or pseudonym.

References:
    DICOM PS3.3 A.3 (CT Image IOD), C.7.6.2 (Image Plane module), C.8.2.1 (CT Image module),
    C.11.1 (Modality LUT module), C.7.6.16 (Multi-frame Functional Groups), A.38 (Enhanced CT Image IOD).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from lungmae_core.errors import InvalidSeriesError
from lungmae_core.volume import Volume, to_canonical

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "REJECTION_CODES",
    "SeriesRejected",
    "SeriesRules",
    "InstanceHeader",
    "FrameGeometry",
    "SkippedFile",
    "DicomSeries",
    "DicomIndex",
    "SlicePlan",
    "read_header",
    "index_tree",
    "group_series",
    "expand_frames",
    "plan_series",
    "choose_per_study",
    "load_series",
    "is_nifti_path",
]

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

#: Every rejection code with what it means; the data card counts rejections by these codes.
REJECTION_CODES: dict[str, str] = {
    "not-dicom": "the file is not DICOM (no 'DICM' prefix after the 128-byte preamble)",
    "unreadable": "the file cannot be read (permissions or I/O error)",
    "truncated": "the file or its pixel data is shorter than its header says",
    "not-an-image": "a DICOM object that holds no image (DICOMDIR, report, ...)",
    "empty-folder": "a folder in the input tree holds no files",
    "inconsistent-series": "instances of one series disagree on patient, study or geometry",
    "not-ct": "the modality is not CT",
    "not-ct-image": "CT modality but not a CT Image Storage object (dose screen, secondary capture, ...)",
    "enhanced-ct": "multi-frame CT without functional groups: its frames cannot be placed",
    "scout": "a localizer/scout/topogram image",
    "no-pixel-data": "instances without (7FE0,0010) Pixel Data",
    "no-decoder": "compressed pixel data for which no decoder is installed",
    "decode-failed": "the pixel data could not be decoded",
    "no-geometry": "missing Image Position/Orientation (Patient) or Pixel Spacing",
    "no-rescale": "missing Rescale Slope/Intercept, so HU cannot be computed",
    "not-grayscale": "colour or multi-sample images",
    "not-axial": "oblique, coronal or sagittal slices",
    "tilted": "gantry tilt: slice positions drift sideways",
    "too-few-slices": "fewer slices than data.min-slices",
    "duplicate-positions": "two different slices at the same position",
    "missing-slices": "gaps in the slice positions too large to fill safely",
    "irregular-spacing": "slice spacing varies beyond data.spacing-tolerance",
    "not-chosen": "another series of the same study was chosen",
    "nifti-invalid": "a NIfTI file that is not a 3D CT volume in HU",
    "implausible-lungs": "lung volume or shape implausible for a chest CT (head/abdomen scan?)",
    "internal-error": "an unexpected error (a bug: please report it with the log)",
}


class SeriesRejected(InvalidSeriesError):
    """A series (or file) that cannot become a training sample, with a code from :data:`REJECTION_CODES`.

    Args:
        code: key of :data:`REJECTION_CODES`.
        message: the cause, phrased to follow "Unable to use series 3 of 12 as ...", without identifiers.
    """

    def __init__(self, code: str, message: str) -> None:
        assert code in REJECTION_CODES, code
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep the code across process boundaries (ProcessPoolExecutor pickles errors)
        return (type(self), (self.code, str(self)))


@dataclasses.dataclass(frozen=True)
class SeriesRules:
    """What makes a series usable and how irregular slice spacing is handled.

    Args:
        min_slices: fewest distinct slice positions for a chest volume. Defaults to 32.
        spacing_tolerance: largest relative deviation of a slice gap from the median gap that still counts
            as uniform (0.1 = 10 %). Defaults to 0.1.
        irregular_spacing: ``"resample"`` interpolates linearly onto a uniform grid at the median spacing
            when that is safe (every gap at most ``max_gap_factor`` median gaps and at most one gap or 10 % of
            the gaps irregular); ``"reject"`` refuses every non-uniform series. Defaults to ``"resample"``.
        max_gap_factor: largest gap, in median gaps, that resampling may bridge (2.0 = one missing slice).
            Defaults to 2.0.
        axial_tolerance_deg: largest angle between the slice normal and the head-foot axis. Defaults to 5.
        tilt_tolerance_mm: largest sideways drift of slice positions over the whole series. Defaults to 1 mm.
    """

    min_slices: int = 32
    spacing_tolerance: float = 0.1
    irregular_spacing: str = "resample"
    max_gap_factor: float = 2.0
    axial_tolerance_deg: float = 5.0
    tilt_tolerance_mm: float = 1.0

    def __post_init__(self) -> None:
        if self.min_slices < 2:
            raise ValueError(f"min_slices should be at least 2, got {self.min_slices}")
        if not 0.0 < self.spacing_tolerance < 1.0:
            raise ValueError(f"spacing_tolerance should be in the range (0, 1), got {self.spacing_tolerance}")
        if self.irregular_spacing not in ("resample", "reject"):
            raise ValueError(f"irregular_spacing should be 'resample' or 'reject', got {self.irregular_spacing!r}")
        if self.max_gap_factor < 1.0:
            raise ValueError(f"max_gap_factor should be at least 1, got {self.max_gap_factor}")
        if not 0.0 <= self.axial_tolerance_deg < 90.0:
            raise ValueError(f"axial_tolerance_deg should be in [0, 90), got {self.axial_tolerance_deg}")
        if self.tilt_tolerance_mm < 0.0:
            raise ValueError(f"tilt_tolerance_mm should be non-negative, got {self.tilt_tolerance_mm}")


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


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """How to assemble a series that passed every check (:func:`plan_series`).

    Args:
        order: indices into ``series.instances`` from the lowest to the highest position along the normal
            (duplicate copies of one SOP instance dropped).
        positions_mm: ``(N,)`` slice positions along the normal, increasing.
        spacing_mm: slice spacing of the assembled volume (the median gap).
        resample: whether slices are interpolated onto a uniform grid.
        notes: what was repaired and why (empty for a clean series), without identifiers.
        slice_thickness_mm: (0018,0050) median, or the spacing when absent.
    """

    order: tuple[int, ...]
    positions_mm: tuple[float, ...]
    spacing_mm: float
    resample: bool
    notes: tuple[str, ...]
    slice_thickness_mm: float
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]

    @property
    def n_slices(self) -> int:
        """Number of slices of the assembled volume (after any resampling)."""
        if not self.resample:
            return len(self.order)
        return int(round((self.positions_mm[-1] - self.positions_mm[0]) / self.spacing_mm)) + 1


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


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _pixel_data_truncated(ds, transfer_syntax: str, frames: int, file_size: int) -> bool:
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
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        slice_thickness=_float(ds.get("SliceThickness")),
        manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
        has_pixel_data=has_pixels,
        pixel_data_truncated=truncated,
        number_of_frames=frames,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        has_rescale=ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None,
        instance_number=int(instance_number) if instance_number not in (None, "") else None,
    )


def _functional(item, shared, sequence: str, keyword: str):
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


def _frame_geometry(ds, n_frames: int) -> tuple[FrameGeometry, ...]:
    """Per-frame geometry and rescale of an Enhanced CT object (empty when it has no functional groups)."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if shared is None and not per_frame:
        return ()
    top_rescale = (_float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept")))
    out = []
    for k in range(n_frames):
        item = per_frame[k] if k < len(per_frame) else None
        slope = _float(_functional(item, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(_functional(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
        if slope is None or intercept is None:
            slope, intercept = top_rescale
        frame_type = _functional(item, shared, "CTImageFrameTypeSequence", "FrameType") or ()
        out.append(FrameGeometry(
            position=_floats(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_floats(_functional(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
            slice_thickness=_float(_functional(item, shared, "PixelMeasuresSequence", "SliceThickness")),
            rescale=(slope, intercept) if slope is not None and intercept is not None else None,
            frame_type=tuple(str(t).upper() for t in frame_type),
        ))
    return tuple(out)  # type: ignore[return-value]


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


# --------------------------------------------------------------------------------------------- checks

def _count(instances: Sequence[InstanceHeader], predicate) -> int:
    return sum(1 for inst in instances if predicate(inst))


def _of(k: int, n: int, unit: str = "instances") -> str:
    """'its only instance' / 'all 5 instances' / '2 of 5 instances' (``unit`` 'frames' for Enhanced CT)."""
    if n == 1:
        return f"its only {unit[:-1]}"
    return f"all {n} {unit}" if k == n else f"{k} of {n} {unit}"


def _of_verb(k: int, n: int, unit: str, singular: str, plural: str) -> str:
    """:func:`_of` followed by the verb agreeing with it."""
    return f"{_of(k, n, unit)} {singular if n == 1 or k == 1 else plural}"


def _check_decoder(transfer_syntax: str) -> None:
    """Raise ``no-decoder`` unless pydicom can decode ``transfer_syntax`` with an installed plugin."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if not transfer_syntax or not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise SeriesRejected(
            "no-decoder",
            f"its pixel data is compressed with transfer syntax {transfer_syntax} ({uid.name}), for which "
            "pydicom has no decoder; re-export the series uncompressed or as JPEG 2000/JPEG-LS/RLE") from None
    if not decoder.is_available:
        needs = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies.items())
        raise SeriesRejected(
            "no-decoder",
            f"its pixel data is compressed as {uid.name} ({transfer_syntax}) and no installed decoder can read "
            f"it; install one of the plugins ({needs or 'pylibjpeg'}) or re-export uncompressed")


def _distinct(values: Iterable[object]) -> list[object]:
    return sorted({v for v in values}, key=repr)


def _rounded(values: tuple[float, ...] | None, ndigits: int = 3) -> tuple[float, ...] | None:
    return None if values is None else tuple(round(v, ndigits) + 0.0 for v in values)


def _check_content(series: DicomSeries) -> None:
    """Modality, SOP class, scout, pixel data presence, truncation, decoders, geometry, rescale."""
    inst = series.instances
    n = len(inst)
    unit = "frames" if any(i.frame is not None for i in inst) else "instances"
    modalities = _distinct(i.modality for i in inst)
    if modalities != ["CT"]:
        shown = ", ".join(repr(m) for m in modalities)
        raise SeriesRejected("not-ct", f"its (0008,0060) 'Modality' is {shown}, not 'CT'")
    if any((i.sop_class_uid in _MULTIFRAME_CT or i.number_of_frames > 1) and i.frame is None for i in inst):
        raise SeriesRejected(
            "enhanced-ct",
            "it is a multi-frame CT object without (5200,9229) 'Shared' or (5200,9230) 'Per-Frame Functional "
            "Groups Sequence', so its frames cannot be placed; re-export the series as classic CT Image Storage "
            "(one slice per file) from the PACS or scanner console")
    if any(i.sop_class_uid not in _CT_IMAGE_CLASSES for i in inst):
        classes = ", ".join(str(c) for c in _distinct(i.sop_class_uid for i in inst))
        raise SeriesRejected(
            "not-ct-image", f"its (0008,0016) 'SOP Class UID' is {classes}, not (Enhanced) CT Image Storage "
                            f"({CT_IMAGE_STORAGE}); dose screens and secondary captures are not CT volumes")
    scouts = _count(inst, lambda i: bool(_SCOUT_TYPES & set(i.image_type)))
    if scouts:
        kinds = sorted(_SCOUT_TYPES & {t for i in inst for t in i.image_type})
        raise SeriesRejected("scout", f"its (0008,0008) 'Image Type' says {'/'.join(kinds)} "
                                      f"({_of(scouts, n, unit)}): a scout/localizer, not an axial volume")
    k = _count(inst, lambda i: not i.has_pixel_data)
    if k:
        raise SeriesRejected("no-pixel-data", f"{_of_verb(k, n, unit, 'has', 'have')} no (7FE0,0010) 'Pixel Data'; "
                                              "re-export the series with images")
    k = _count(inst, lambda i: i.pixel_data_truncated)
    if k:
        raise SeriesRejected("truncated", f"{_of_verb(k, n, unit, 'is', 'are')} truncated (the file ends before the "
                                          "declared (7FE0,0010) 'Pixel Data' length); re-copy the series")
    for syntax in _distinct(i.transfer_syntax for i in inst):
        _check_decoder(str(syntax))
    for keyword, tag, attr in (("Image Position (Patient)", "0020,0032", "position"),
                               ("Image Orientation (Patient)", "0020,0037", "orientation"),
                               ("Pixel Spacing", "0028,0030", "pixel_spacing"),
                               ("Rows", "0028,0010", "rows"), ("Columns", "0028,0011", "columns")):
        k = _count(inst, lambda i, a=attr: getattr(i, a) is None)
        if k:
            raise SeriesRejected("no-geometry", f"{_of_verb(k, n, unit, 'has', 'have')} no valid ({tag}) '{keyword}', "
                                                "needed to place slices in the patient; re-export the series with "
                                                "its Image Plane module")
    k = _count(inst, lambda i: not i.has_rescale)
    if k:
        raise SeriesRejected("no-rescale", f"{_of_verb(k, n, unit, 'has', 'have')} no (0028,1052) 'Rescale Intercept' "
                                           "or (0028,1053) 'Rescale Slope', needed to convert to HU; re-export it "
                                           "with the Modality LUT module, or exclude it")
    k = _count(inst, lambda i: i.samples_per_pixel != 1)
    if k:
        raise SeriesRejected("not-grayscale", f"{_of_verb(k, n, unit, 'has', 'have')} (0028,0002) 'Samples per Pixel' "
                                              "other than 1; CT slices must be grayscale")
    owners = {(i.patient_id, i.study_uid) for i in inst}
    if len(owners) > 1:  # the values are identifiers: say how many, never which
        raise SeriesRejected(
            "inconsistent-series",
            f"its instances belong to {len(owners)} different (0010,0020) 'Patient ID' / (0020,000D) 'Study "
            "Instance UID' pairs under one (0020,000E) 'Series Instance UID'; fix the export")
    for label, values in (
        ("(0028,0010) 'Rows' x (0028,0011) 'Columns'", [(i.rows, i.columns) for i in inst]),
        ("(0028,0030) 'Pixel Spacing'", [_rounded(i.pixel_spacing) for i in inst]),
        ("(0020,0037) 'Image Orientation (Patient)'", [_rounded(i.orientation) for i in inst]),
    ):
        distinct = Counter(values)
        if len(distinct) > 1:
            shown = ": " + ", ".join(f"{v} ({c})" for v, c in distinct.most_common(4))
            raise SeriesRejected(
                "inconsistent-series",
                f"its instances have {len(distinct)} different {label}{shown}; the export mixes several "
                "acquisitions under one (0020,000E) 'Series Instance UID'")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def plan_series(series: DicomSeries, rules: SeriesRules = SeriesRules()) -> SlicePlan:
    """Check a series from its headers and decide how to assemble it.

    Args:
        series: one Series Instance UID's instances.
        rules: eligibility thresholds and what to do with irregular spacing.

    Returns:
        The slice order, positions, spacing and any repair (``resample``) with a note saying why.

    Raises:
        SeriesRejected: with a code from :data:`REJECTION_CODES` and a message saying why and how to fix it.
    """
    _check_content(series)
    inst = series.instances
    first = inst[0]
    orient = np.asarray(first.orientation, dtype=np.float64)
    row_dir, col_dir = _unit(orient[:3]), _unit(orient[3:])
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesRejected("no-geometry", "its (0020,0037) 'Image Orientation (Patient)' has parallel row and "
                                            "column directions")
    normal = _unit(normal)
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if angle > rules.axial_tolerance_deg:
        raise SeriesRejected(
            "not-axial", f"its slices are not axial: the slice normal is {angle:.1f} degrees from the patient's "
                         f"head-foot axis (limit {rules.axial_tolerance_deg:g}); oblique, coronal and sagittal "
                         "series are not used")

    # Sort by position along the normal; drop extra copies of the same SOP instance.
    positions = np.asarray([inst_.position for inst_ in inst], dtype=np.float64)  # (N, 3)
    along = positions @ normal  # (N,)
    order = sorted(range(len(inst)), key=lambda i: (along[i], inst[i].identity))
    kept: list[int] = []
    copies = 0
    for i in order:
        if kept and inst[kept[-1]].identity == inst[i].identity:
            copies += 1
            continue
        kept.append(i)
    notes: list[str] = []
    if copies:
        notes.append(f"ignored {copies} extra cop{'y' if copies == 1 else 'ies'} of the same instance")
    s = along[kept]
    n_kept = len(kept)
    if n_kept < rules.min_slices:
        raise SeriesRejected(
            "too-few-slices", f"it has only {n_kept} slice{'s' if n_kept != 1 else ''}; at least "
                              f"{rules.min_slices} are needed for a chest CT volume (data.min-slices)")
    gaps = np.diff(s)
    dup = np.flatnonzero(gaps < _DUPLICATE_MM)
    if dup.size:
        raise SeriesRejected(
            "duplicate-positions",
            f"{dup.size} pair{'s' if dup.size > 1 else ''} of different slices share one position (first at "
            f"slice {int(dup[0]) + 1} of {n_kept}); the series holds repeated slices or two acquisitions; "
            "re-export it or remove the extra slices")

    # Tilt: positions must move along the normal only.
    drift_vec = (positions[kept] - positions[kept[0]]) - np.outer(s - s[0], normal)
    drift = float(np.max(np.linalg.norm(drift_vec, axis=1)))
    if drift > rules.tilt_tolerance_mm:
        length = float(s[-1] - s[0])
        tilt = float(np.degrees(np.arctan2(drift, length)))
        raise SeriesRejected(
            "tilted", f"its slice positions drift {drift:.1f} mm sideways over {length:.0f} mm (gantry tilt about "
                      f"{tilt:.1f} degrees; limit {rules.tilt_tolerance_mm:g} mm); tilted acquisitions are not "
                      "supported: re-export with tilt correction")

    spacing = float(np.median(gaps))
    deviation = np.abs(gaps - spacing) / spacing
    irregular = np.flatnonzero(deviation > rules.spacing_tolerance)
    resample = False
    if irregular.size:
        worst = int(irregular[np.argmax(gaps[irregular])])
        multiples = np.round(gaps[irregular] / spacing)
        integer_gaps = bool(np.all(np.abs(gaps[irregular] - multiples * spacing)
                                   <= rules.spacing_tolerance * spacing) and np.all(multiples >= 2))
        code = "missing-slices" if integer_gaps else "irregular-spacing"
        what = (f"{int(np.sum(multiples - 1))} slice{'s are' if np.sum(multiples - 1) > 1 else ' is'} missing"
                if integer_gaps else f"{irregular.size} of {gaps.size} slice gaps differ from the median by more "
                                     f"than {rules.spacing_tolerance:.0%}")
        where = (f"largest gap {gaps[worst]:.2f} mm after slice {worst + 1} of {n_kept}; median spacing "
                 f"{spacing:.2f} mm")
        too_big = float(np.max(gaps)) > rules.max_gap_factor * spacing * (1 + rules.spacing_tolerance)
        too_many = irregular.size > max(1.0, 0.1 * gaps.size)
        if rules.irregular_spacing == "reject":
            raise SeriesRejected(code, f"{what} ({where}) and data.irregular-spacing is 'reject'")
        if too_big or too_many:
            why = (f"a gap is over {rules.max_gap_factor:g} times the median spacing (data.max-gap-factor)"
                   if too_big else "more than 10% of the gaps are irregular")
            raise SeriesRejected(code, f"{what} ({where}); not resampled as {why}")
        resample = True
        notes.append(f"resampled to uniform {spacing:.2f} mm slices by linear interpolation as {what} ({where})")

    thickness = [i.slice_thickness for i in inst if i.slice_thickness is not None]
    return SlicePlan(
        order=tuple(kept),
        positions_mm=tuple(float(v) for v in s),
        spacing_mm=spacing,
        resample=resample,
        notes=tuple(notes),
        slice_thickness_mm=float(np.median(thickness)) if thickness else spacing,
        rows=int(first.rows),  # type: ignore[arg-type]
        columns=int(first.columns),  # type: ignore[arg-type]
        pixel_spacing=(float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),  # type: ignore[index]
    )


def choose_per_study(candidates: Sequence[tuple[DicomSeries, SlicePlan]]) -> dict[str, str]:
    """Pick one series per (patient, study) among eligible ones.

    Rule, in order: smallest slice spacing (0.01 mm resolution), most slices, most pixels per slice, then
    the smallest Series Instance UID (only to make reruns agree).

    Args:
        candidates: eligible series with their plans.

    Returns:
        ``{series_uid: chosen_series_uid}`` for every candidate (a chosen series maps to itself).
    """
    by_study: dict[tuple[str, str], list[tuple[DicomSeries, SlicePlan]]] = defaultdict(list)
    for series, plan in candidates:
        by_study[(series.patient_id, series.study_uid)].append((series, plan))
    chosen: dict[str, str] = {}
    for group in by_study.values():
        best = min(group, key=lambda sp: (round(sp[1].spacing_mm, 2), -sp[1].n_slices,
                                          -(sp[1].rows * sp[1].columns), sp[0].series_uid))
        for series, _ in group:
            chosen[series.series_uid] = best[0].series_uid
    return chosen


# --------------------------------------------------------------------------------------------- volumes

def _decode(header: InstanceHeader, index: int, total: int) -> tuple[np.ndarray, float, float]:
    """Read a file's stored pixel values and its top-level Rescale Slope/Intercept.

    Returns:
        ``pixels``: ``(rows, columns)``, or ``(frames, rows, columns)`` for a multi-frame object; slope;
        intercept (NaN when absent: frames carry their own).
    """
    import pydicom

    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(header.path)
            pixels = ds.pixel_array
            slope = _float(ds.get("RescaleSlope"))
            intercept = _float(ds.get("RescaleIntercept"))
    except (OSError, EOFError) as exc:
        raise SeriesRejected("truncated", f"slice {index} of {total} cannot be read ({type(exc).__name__}); "
                                          "re-copy the series") from exc
    except Exception as exc:  # decoder plugins raise their own types
        text = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise SeriesRejected("decode-failed", f"the pixel data of slice {index} of {total} cannot be decoded "
                                              f"({type(exc).__name__}: {text})") from exc
    if header.frame is not None and header.number_of_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    nan = float("nan")  # frames carry their own rescale; a classic slice without one was rejected earlier
    return pixels, nan if slope is None else slope, nan if intercept is None else intercept


def _read_slice(header: InstanceHeader, index: int, total: int,
                decoded: dict[str, tuple[np.ndarray, float, float]]) -> np.ndarray:
    """One slice in HU: ``(rows, columns)`` float32 = stored value * Rescale Slope + Rescale Intercept.

    ``decoded`` keeps multi-frame files decoded once for all their frames.
    """
    if header.frame is None:
        pixels, slope, intercept = _decode(header, index, total)
    else:
        if header.path not in decoded:
            decoded[header.path] = _decode(header, index, total)
        frames, slope, intercept = decoded[header.path]
        if frames.ndim != 3 or header.frame >= frames.shape[0]:
            raise SeriesRejected("decode-failed", f"frame {header.frame + 1} of slice {index} of {total} is not in "
                                                  f"the decoded pixel data (shape {frames.shape})")
        pixels = frames[header.frame]
        if header.rescale is not None:
            slope, intercept = header.rescale
    if pixels.shape != (header.rows, header.columns):
        raise SeriesRejected("decode-failed", f"slice {index} of {total} decodes to shape {pixels.shape}, not "
                                              f"(Rows, Columns) = ({header.rows}, {header.columns})")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _resample_slices(stack: np.ndarray, positions: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation along D onto ``positions[0] + k * spacing``.

    stack: (N, H, W) float32 at increasing ``positions`` (N,) -> (M, H, W) float32.
    """
    n_out = int(round((positions[-1] - positions[0]) / spacing)) + 1
    targets = positions[0] + spacing * np.arange(n_out)
    targets = np.clip(targets, positions[0], positions[-1])
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((targets - positions[lower]) / (positions[upper] - positions[lower])).astype(np.float32)
    weight = weight[:, None, None]
    return (1.0 - weight) * stack[lower] + weight * stack[upper]  # (M, H, W)


def load_series(series: DicomSeries, rules: SeriesRules = SeriesRules(), plan: SlicePlan | None = None) -> Volume:
    """Assemble a series into a canonical HU volume from its geometry.

    Args:
        series: the instances of one series.
        rules: used to make the plan when ``plan`` is not given.
        plan: the result of :func:`plan_series` when already computed.

    Returns:
        A :class:`Volume` with ``hu: (D, H, W) float32`` in canonical LPS orientation (``to_canonical``).
        Affine columns: D along the slice normal times the spacing, H along the column direction times
        (0028,0030)[0] (row spacing), W along the row direction times (0028,0030)[1].

    Raises:
        SeriesRejected: for every check of :func:`plan_series`, and for pixel data that cannot be decoded.

    Examples:
        >>> vol = load_series(series)          # doctest: +SKIP
        >>> vol.hu.shape, vol.spacing_mm       # doctest: +SKIP
        ((100, 160, 160), (2.5, 1.25, 1.25))
    """
    plan = plan or plan_series(series, rules)
    inst = series.instances
    total = len(plan.order)
    stack = np.empty((total, plan.rows, plan.columns), dtype=np.float32)  # (N, H, W)
    decoded: dict[str, tuple[np.ndarray, float, float]] = {}
    for k, i in enumerate(plan.order):
        stack[k] = _read_slice(inst[i], k + 1, total, decoded)
    decoded.clear()
    positions = np.asarray(plan.positions_mm)
    if plan.resample:
        stack = _resample_slices(stack, positions, plan.spacing_mm)
    first = inst[plan.order[0]]
    orient = np.asarray(first.orientation, dtype=np.float64)
    row_dir, col_dir = _unit(orient[:3]), _unit(orient[3:])
    normal = _unit(np.cross(row_dir, col_dir))
    affine = np.eye(4)
    affine[:3, 0] = normal * plan.spacing_mm
    affine[:3, 1] = col_dir * plan.pixel_spacing[0]
    affine[:3, 2] = row_dir * plan.pixel_spacing[1]
    affine[:3, 3] = np.asarray(first.position, dtype=np.float64)
    if not np.all(np.isfinite(stack)):
        raise SeriesRejected("decode-failed", "the HU values are not all finite after applying Rescale "
                                              "Slope/Intercept")
    return to_canonical(Volume(stack, affine))
