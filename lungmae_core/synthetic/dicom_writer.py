"""Write synthetic hospitals: phantoms as real CT Image Storage series, the way a PACS export looks.

Simulation mode uses exactly the path a hospital uses (DICOM tree -> ``lungmae site prepare`` -> training), so
the synthetic files must be real DICOM: every type 1 and type 2 attribute of the CT Image IOD (PS3.3 A.3;
checked with dciodvfy in the tests), stored values with Rescale Slope/Intercept, the Image Plane module
describing where each slice sits. Each site's :class:`~lungmae_core.synthetic.scanners.ScannerProfile` shows in the
files: manufacturer and model, pixel spacing, slice thickness and spacing, noise, patient position (a
feet-first-supine series has mirrored rows and is numbered from the feet), signed vs unsigned storage.
Like a real export, a site tree also holds a scout (localizer) per study, a Secondary Capture dose screen
and a text file, which preparation must reject with a reason.

Layout of a site written by :func:`write_site`::

    <site>/dicom/<patient>/<study>/<series>/IM000001.dcm ...   one CT series + one scout per study
    <site>/dicom/<patient>/<study>/DOSE/IM000001.dcm           one dose screen per site (not CT)
    <site>/dicom/EXPORT.TXT                                    a non-DICOM file
    <site>/labels.csv                                          patient_id,label

Examples:
    >>> result = write_site("out/site0", site_index=0, n_scans=4, seed=0)   # doctest: +SKIP
    >>> len(result.scans), result.labels_csv.name                           # doctest: +SKIP
    (4, 'labels.csv')
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lungmae_core.atomic import atomic_path, atomic_write_text
from lungmae_core.synthetic.phantoms import PHANTOM_CLASSES, generate_phantom
from lungmae_core.synthetic.scanners import ScannerProfile, scanner_for_site

if TYPE_CHECKING:  # pydicom is imported where a file is written
    from pydicom.dataset import Dataset, FileDataset

__all__ = ["SyntheticStudy", "SyntheticScan", "SiteSynthResult", "write_ct_series", "write_scout",
           "write_dose_screen", "write_site", "make_study"]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root, as pydicom itself uses
_ORIENTATION = {  # (0020,0037) row direction, column direction for an axial slice, per patient position
    "HFS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class SyntheticStudy:
    """The identifiers of one synthetic patient's study (all fake, derived from a seed)."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    accession_number: str
    study_id: str
    study_date: str
    frame_of_reference_uid: str


@dataclasses.dataclass(frozen=True)
class SyntheticScan:
    """One written CT series with its ground truth (for tests and the simulation's expectations)."""

    patient_id: str
    study_uid: str
    series_uid: str
    label: str
    n_files: int
    lung_volume_ml: float
    series_dir: Path


@dataclasses.dataclass(frozen=True)
class SiteSynthResult:
    """What :func:`write_site` wrote."""

    root: Path
    dicom_dir: Path
    labels_csv: Path
    scanner: ScannerProfile
    scans: tuple[SyntheticScan, ...]


def _uid(*parts: object) -> str:
    """A deterministic UID under the 2.25 root: the decimal of 128 bits of SHA-256 of ``parts``.

    Same arguments, same UID, so a rerun of ``lungmae synth`` writes identical files (and caches stay valid);
    pydicom's ``generate_uid(prefix=None)`` would be random.
    """
    import hashlib

    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def make_study(site_index: int, scan_index: int, seed: int) -> SyntheticStudy:
    """Fake but plausible identifiers for scan ``scan_index`` of site ``site_index``."""
    rng = np.random.default_rng([seed, site_index, scan_index, 7])
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 45)))
    study_day = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 600)))
    pid = f"S{site_index}P{scan_index:04d}"
    return SyntheticStudy(
        patient_id=pid,
        patient_name=f"SYNTH^PATIENT{site_index}{scan_index:04d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=("F", "M")[int(rng.integers(0, 2))],
        study_uid=_uid("study", seed, site_index, scan_index),
        accession_number=f"A{site_index}{seed % 1000:03d}{scan_index:05d}",
        study_id=str(scan_index + 1),
        study_date=study_day.strftime("%Y%m%d"),
        frame_of_reference_uid=_uid("for", seed, site_index, scan_index),
    )


def _base_dataset(study: SyntheticStudy, scanner: ScannerProfile, *, sop_class: str, sop_uid: str, series_uid: str,
                  modality: str, series_number: int, series_description: str) -> FileDataset:
    """A dataset with file meta and the Patient, General Study, General Series, General Equipment, SOP Common."""
    # the package first: write_site runs in threads, and a thread that takes pydicom.dataset while another is
    # still in pydicom/__init__ gets a save_as that calls pydicom.dcmwrite before it exists
    import pydicom  # noqa: F401
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = "LUNGMAE_SYNTH"
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500.000000"
    ds.AccessionNumber = study.accession_number
    ds.Modality = modality
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = scanner.model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    return ds


def _ct_dataset(study: SyntheticStudy, scanner: ScannerProfile, *, sop_uid: str, series_uid: str, series_number: int,
                series_description: str, image_type: str, slice_thickness: str, kvp: str) -> Dataset:
    """:func:`_base_dataset` of a CT image, with what an axial series and a scout share: the CT Image module's
    acquisition (image type, body part, slice thickness, kVp), the patient position and the Frame of Reference."""
    ds = _base_dataset(study, scanner, sop_class=CT_IMAGE_STORAGE, sop_uid=sop_uid, series_uid=series_uid,
                       modality="CT", series_number=series_number, series_description=series_description)
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = slice_thickness
    ds.KVP = kvp
    ds.PatientPosition = scanner.patient_position
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _pixel_module(ds: Dataset, pixels: np.ndarray, *, signed: bool) -> None:
    """Image Pixel module for ``pixels: (rows, columns)`` int16/uint16 stored values."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def _stored(hu: np.ndarray, signed: bool) -> tuple[np.ndarray, float]:
    """HU -> stored values and Rescale Intercept: signed int16 with intercept 0, or 12-bit unsigned with -1024."""
    if signed:
        return np.clip(np.rint(hu), -32768, 32767).astype(np.int16), 0.0
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16), -1024.0


def _save(ds: Dataset, path: Path) -> None:
    """Write a DICOM file atomically (temporary name, then rename)."""
    with atomic_path(path, fsync=False) as tmp:  # synthetic: regenerated at will, thousands of files
        ds.save_as(tmp, enforce_file_format=True)


def _signed_storage(scanner: ScannerProfile) -> bool:
    # Vendors differ: store 12-bit unsigned values with intercept -1024 for some, signed HU for others.
    return not scanner.manufacturer.upper().startswith(("GE", "TOSHIBA"))


def write_ct_series(hu: np.ndarray, spacing_mm: Sequence[float] | np.ndarray, out_dir: str | os.PathLike[str], *,
                    study: SyntheticStudy, scanner: ScannerProfile, series_uid: str | None = None,
                    series_number: int = 2, origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
                    signed: bool | None = None, file_prefix: str = "IM") -> list[Path]:
    """Write a canonical HU volume as an axial CT Image Storage series, one file per slice.

    Args:
        hu: ``(D, H, W)`` float32 HU, canonical (D to +S, H to +P, W to +L).
        spacing_mm: ``(d, h, w)`` voxel size in mm; ``h`` and ``w`` become (0028,0030) Pixel Spacing.
        out_dir: the series folder (created).
        study: patient and study identifiers.
        scanner: manufacturer, model, slice thickness, kVp and patient position ("HFS" or "FFS"). A feet-first
            series gets (0020,0037) = (-1, 0, 0, 0, 1, 0), mirrored rows, and instance numbers from the feet.
        series_uid: (0020,000E); derived from the study when None.
        series_number: (0020,0011).
        origin_mm: LPS position ``(x, y, z)`` of voxel ``[0, 0, 0]``.
        signed: signed int16 storage with intercept 0, or 12-bit unsigned with intercept -1024; None picks by
            manufacturer.
        file_prefix: file names are ``<prefix><instance:06d>.dcm``.

    Returns:
        The written paths, in instance number order.
    """
    # the package first: write_site runs in threads, and a thread that takes pydicom.dataset while another is
    # still in pydicom/__init__ gets a save_as that calls pydicom.dcmwrite before it exists
    import pydicom  # noqa: F401
    from pydicom.uid import UID

    hu = np.asarray(hu, dtype=np.float32)
    assert hu.ndim == 3, hu.shape
    sd, sh, sw = (float(s) for s in spacing_mm)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    position = scanner.patient_position
    orientation = _ORIENTATION[position]
    signed = _signed_storage(scanner) if signed is None else signed
    series_uid = series_uid or _uid("series", study.study_uid, series_number)
    depth, _rows, cols = hu.shape
    # HFS scanners number from the head (top slice first), FFS from the feet.
    slice_order = range(depth - 1, -1, -1) if position == "HFS" else range(depth)
    # One dataset for the whole series (the header is the same on every slice); per slice only the
    # instance-specific elements change. Building 100 datasets from scratch doubled the writing time.
    ds = _ct_dataset(study, scanner, sop_uid=_uid("sop", series_uid, 0), series_uid=series_uid,
                     series_number=series_number, series_description="CHEST 1.0 AXIAL", image_type="AXIAL",
                     slice_thickness=f"{scanner.slice_thickness_mm:.2f}", kvp=f"{scanner.kvp:g}")
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = f"{500.0:.1f}"
    ds.ReconstructionDiameter = f"{cols * sw:.2f}"
    ds.GantryDetectorTilt = "0"
    ds.ConvolutionKernel = scanner.name.split("-")[1].upper() if "-" in scanner.name else "STANDARD"
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.PixelSpacing = [f"{sh:.6g}", f"{sw:.6g}"]
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    x0 = origin_mm[0] + (0.0 if position == "HFS" else (cols - 1) * sw)
    paths: list[Path] = []
    for number, d in enumerate(slice_order, start=1):
        image = hu[d] if position == "HFS" else hu[d, :, ::-1]  # FFS rows run toward the patient's right
        ipp = (x0, origin_mm[1], origin_mm[2] + d * sd)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid("sop", series_uid, number))
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.SliceLocation = f"{ipp[2]:.4f}"
        stored, intercept = _stored(image, signed)
        ds.RescaleIntercept = f"{intercept:g}"
        _pixel_module(ds, stored, signed=signed)
        path = out_dir / f"{file_prefix}{number:06d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def write_scout(hu: np.ndarray, spacing_mm: Sequence[float] | np.ndarray, out_dir: str | os.PathLike[str], *,
                study: SyntheticStudy, scanner: ScannerProfile, series_number: int = 1) -> Path:
    """Write an anterior-posterior localizer (topogram) of the volume: one coronal projection image.

    Args:
        hu: ``(D, H, W)`` canonical HU; the projection averages attenuation over H (front to back).
        spacing_mm: ``(d, h, w)`` in mm.
        out_dir: the series folder (created).
        study: identifiers (same study as the CT series).
        scanner: manufacturer and model.
        series_number: (0020,0011).

    Returns:
        The path of the single scout file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd, _sh, sw = (float(s) for s in spacing_mm)
    mu = np.clip(np.asarray(hu, dtype=np.float32) + 1000.0, 0, None).mean(axis=1)  # (D, W) attenuation
    image = (mu / max(float(mu.max()), 1.0) * 2000.0 - 1000.0)[::-1]  # rows from head to feet
    series_uid = _uid("scout", study.study_uid, series_number)
    ds = _ct_dataset(study, scanner, sop_uid=_uid("sop", series_uid, 1), series_uid=series_uid,
                     series_number=series_number, series_description="TOPOGRAM 0.6 T20", image_type="LOCALIZER",
                     slice_thickness="0.6", kvp="120")
    ds.InstanceNumber = 1
    depth = hu.shape[0]
    ds.ImagePositionPatient = ["0.0", "0.0", f"{(depth - 1) * sd:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [f"{sd:.6g}", f"{sw:.6g}"]
    stored, intercept = _stored(image, True)
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    _pixel_module(ds, stored, signed=True)
    path = out_dir / "IM000001.dcm"
    _save(ds, path)
    return path


def write_dose_screen(out_dir: str | os.PathLike[str], *, study: SyntheticStudy, scanner: ScannerProfile) -> Path:
    """Write a Secondary Capture "dose report" screenshot, as scanners append to each exam (not a CT volume)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = _uid("dose", study.study_uid)
    ds = _base_dataset(study, scanner, sop_class=SECONDARY_CAPTURE_STORAGE, sop_uid=_uid("sop", series_uid, 1),
                       series_uid=series_uid, modality="OT", series_number=999, series_description="DOSE REPORT")
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.Laterality = ""
    image = np.zeros((64, 96), dtype=np.uint16)
    image[8:56:8, 8:88] = 200  # text-like lines
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = image.tobytes()
    path = out_dir / "IM000001.dcm"
    _save(ds, path)
    return path


def _site_labels(site_index: int, n_scans: int, seed: int) -> list[str]:
    """Classes for a site's scans: every class in turn, in a site-specific order (near balanced)."""
    rng = np.random.default_rng([seed, site_index, 11])
    order = list(rng.permutation(len(PHANTOM_CLASSES)))
    return [PHANTOM_CLASSES[order[i % len(order)]] for i in range(n_scans)]


#: One study to write: DICOM folder, site index, scan index, seed, label, scanner, phantom shape (None: default).
_ScanTask = tuple[Path, int, int, int, str, ScannerProfile, tuple[int, ...] | None]


def _write_one_scan(args: _ScanTask) -> SyntheticScan:
    """Generate and write one phantom study (a top-level function so worker processes can run it)."""
    dicom_dir, site_index, scan_index, seed, label, scanner, shape = args
    study = make_study(site_index, scan_index, seed)
    phantom = generate_phantom(label, seed=seed * 100_003 + site_index * 1_009 + scan_index, scanner=scanner,
                               shape=shape)
    rng = np.random.default_rng([seed, site_index, scan_index, 3])
    # Table height and scan range differ per exam: origin in LPS mm.
    depth, rows, cols = phantom.hu.shape
    sd, sh, sw = (float(s) for s in phantom.spacing_mm)
    origin = (-(cols - 1) * sw / 2.0, -(rows - 1) * sh / 2.0 + float(rng.uniform(-10, 10)),
              -float(rng.uniform(100, 200)) - depth * sd)
    study_dir = Path(dicom_dir) / f"{study.patient_id}" / f"ST{scan_index:04d}"
    series_uid = _uid("series", study.study_uid, 2)
    paths = write_ct_series(phantom.hu, phantom.spacing_mm, study_dir / "SE000002", study=study, scanner=scanner,
                            series_uid=series_uid, series_number=2, origin_mm=origin)
    write_scout(phantom.hu, phantom.spacing_mm, study_dir / "SE000001", study=study, scanner=scanner)
    return SyntheticScan(patient_id=study.patient_id, study_uid=study.study_uid, series_uid=series_uid,
                         label=label, n_files=len(paths), lung_volume_ml=phantom.lung_volume_ml,
                         series_dir=study_dir / "SE000002")


def write_site(root: str | os.PathLike[str], *, site_index: int, n_scans: int, seed: int = 0,
               shape: Sequence[int] | None = None, labelled_fraction: float = 1.0, workers: int = 1,
               scanner: ScannerProfile | None = None, progress: bool = False,
               pool: Executor | None = None) -> SiteSynthResult:
    """Write one synthetic hospital: a DICOM tree of phantom studies, extra non-volume files and labels.csv.

    Args:
        root: the site folder (created); DICOM goes under ``root/dicom``.
        site_index: which hospital (picks the scanner profile and the identifiers).
        n_scans: number of patients, one chest CT study each.
        seed: the run's seed; the same arguments always write the same files (UIDs included).
        shape: ``(D, H, W)`` of each series; defaults to the scanner's (about 100 x 160 x 160).
        labelled_fraction: fraction of patients listed in labels.csv (the rest stay unlabelled). Defaults to 1.
        workers: processes generating phantoms in parallel. Defaults to 1.
        pool: a process pool to use instead of making one (several sites written at once share it).
        scanner: overrides ``scanner_for_site(site_index)``.
        progress: show a tqdm bar.

    Returns:
        A :class:`SiteSynthResult`.

    Raises:
        ValueError: if ``n_scans`` < 1, ``workers`` < 1 or ``labelled_fraction`` outside [0, 1].
    """
    if n_scans < 1:
        raise ValueError(f"n_scans should be at least 1, got {n_scans}")
    if workers < 1:
        raise ValueError(f"workers should be at least 1, got {workers}")
    if not 0.0 <= labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction should be in [0, 1], got {labelled_fraction}")
    root = Path(root)
    dicom_dir = root / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    scanner = scanner or scanner_for_site(site_index)
    labels = _site_labels(site_index, n_scans, seed)
    shape_t = tuple(int(n) for n in shape) if shape is not None else None
    tasks: list[_ScanTask] = [(dicom_dir, site_index, i, seed, labels[i], scanner, shape_t) for i in range(n_scans)]
    if pool is not None:
        scans = _progress(pool.map(_write_one_scan, tasks), n_scans, progress, f"site {site_index}")
    elif workers > 1 and n_scans > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, n_scans)) as pool:
            results = pool.map(_write_one_scan, tasks)
            scans = _progress(results, n_scans, progress, f"site {site_index}")
    else:
        scans = _progress(map(_write_one_scan, tasks), n_scans, progress, f"site {site_index}")
    first = make_study(site_index, 0, seed)
    write_dose_screen(dicom_dir / first.patient_id / "ST0000" / "DOSE", study=first, scanner=scanner)
    atomic_write_text(dicom_dir / "EXPORT.TXT", f"Exported by Synthetic PACS 1.0\nstudies: {n_scans}\n")
    n_labelled = int(round(labelled_fraction * n_scans))
    labelled = set(np.random.default_rng([seed, site_index, 13]).permutation(n_scans)[:n_labelled].tolist())
    labels_csv = root / "labels.csv"
    lines = ["patient_id,label"] + [f"{s.patient_id},{s.label}" for i, s in enumerate(scans) if i in labelled]
    atomic_write_text(labels_csv, "\n".join(lines) + "\n")
    logger.info("Wrote synthetic site %d: %d studies (%s, %s) to %s", site_index, n_scans, scanner.manufacturer,
                scanner.patient_position, root)
    return SiteSynthResult(root=root, dicom_dir=dicom_dir, labels_csv=labels_csv, scanner=scanner,
                           scans=tuple(scans))


def _progress(iterable: Iterable[SyntheticScan], total: int, show: bool, desc: str) -> list[SyntheticScan]:
    if show:
        from tqdm.auto import tqdm

        iterable = tqdm(iterable, total=total, desc=f"Writing {desc}", unit="study")
    return list(iterable)
