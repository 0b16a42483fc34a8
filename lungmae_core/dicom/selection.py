"""Step 2 of DICOM intake: decide from the headers whether a series can become a chest CT volume, and
choose one series per study. See :mod:`lungmae_core.dicom` for the rules and their references.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lungmae_core.dicom.errors import SeriesRejected
from lungmae_core.dicom.index import (
    _CT_IMAGE_CLASSES,
    _DUPLICATE_MM,
    _MULTIFRAME_CT,
    _SCOUT_TYPES,
    CT_IMAGE_STORAGE,
    DicomSeries,
    InstanceHeader,
)


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


# --------------------------------------------------------------------------------------------- checks

def _count(instances: Sequence[InstanceHeader], predicate: Callable[[InstanceHeader], bool]) -> int:
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
    import pydicom  # noqa: F401  # the package first: its parts, taken while another thread imports it, are unfinished
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
        needs = "; ".join(decoder.missing_dependencies)  # e.g. "pylibjpeg - requires pylibjpeg-rle"
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
        k = sum(1 for i in inst if getattr(i, attr) is None)
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
    unit: np.ndarray = v / np.linalg.norm(v)
    return unit


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
