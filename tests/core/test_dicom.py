"""DICOM indexing, series checks and volume assembly on real files (pydicom's test data and files we write)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from lungmae_core.dicom import (
    REJECTION_CODES,
    SeriesRejected,
    SeriesRules,
    choose_per_study,
    index_tree,
    load_series,
    plan_series,
    read_header,
)
from lungmae_core.errors import InvalidSeriesError
from tests.dicom_factory import edit, tiny_hu, write_enhanced, write_series

RULES = SeriesRules(min_slices=4)
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def _only_series(folder: Path):
    index = index_tree(folder)
    assert len(index.series) == 1, index
    return index.series[0]


def _z(ds: pydicom.Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


# ----------------------------------------------------------------------------------------- real pydicom data

def test_pydicom_five_slice_ct_sorted_by_geometry_with_rescale(tmp_path: Path) -> None:
    src = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
    shutil.copytree(src, tmp_path / "ct5")
    series = _only_series(tmp_path / "ct5")
    plan = plan_series(series, SeriesRules(min_slices=2))
    volume = load_series(series, plan=plan)
    files = sorted((pydicom.dcmread(p) for p in (tmp_path / "ct5").iterdir()), key=_z)
    assert volume.shape == (5, files[0].Rows, files[0].Columns)
    assert volume.spacing_mm == pytest.approx((2.5, 0.488281, 0.488281), abs=1e-5)
    assert volume.orientation == "SPL"
    for k, ds in enumerate(files):  # slice k is the k-th from the feet, in HU
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.hu[k], expected.astype(np.float32))
    np.testing.assert_allclose(volume.affine[:3, 3], [float(v) for v in files[0].ImagePositionPatient], atol=1e-4)


def test_pydicom_ct_small_single_slice_is_too_few(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "a.dcm")
    with pytest.raises(SeriesRejected, match=r"only 1 slice; at least 4 are needed") as err:
        plan_series(_only_series(tmp_path), RULES)
    assert err.value.code == "too-few-slices"


def test_pydicom_series_with_big_gap_is_rejected_as_missing_slices(tmp_path: Path) -> None:
    shutil.copytree(TEST_FILES / "dicomdirtests" / "77654033" / "CT2", tmp_path / "ct2")
    with pytest.raises(SeriesRejected, match=r"slices are missing \(largest gap 202.50 mm after slice 1 of 4") as err:
        plan_series(_only_series(tmp_path / "ct2"), SeriesRules(min_slices=2))
    assert err.value.code == "missing-slices"
    assert "data.max-gap-factor" in str(err.value)


def test_pydicom_dicomdir_tree_indexes_with_reasons() -> None:
    index = index_tree(TEST_FILES / "dicomdirtests")
    skipped = sorted((Path(s.path).name[:6], s.code) for s in index.skipped)
    assert skipped == [("DICOMD", "not-an-image")] * 8 + [("README", "not-dicom")] * 2
    kinds = {}
    for series in index.series:
        try:
            plan_series(series, SeriesRules(min_slices=2))
            kinds["ok"] = kinds.get("ok", 0) + 1
        except SeriesRejected as exc:
            kinds[exc.code] = kinds.get(exc.code, 0) + 1
    assert kinds == {"ok": 1, "not-ct": 10, "scout": 1, "no-pixel-data": 1, "missing-slices": 1}


# ----------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("position,signed", [("HFS", True), ("HFS", False), ("FFS", True), ("FFS", False)])
def test_round_trip_is_exact_and_canonical(tmp_path: Path, position: str, signed: bool) -> None:
    hu = tiny_hu()
    write_series(tmp_path, hu, (2.5, 0.7, 0.8), position=position, signed=signed, origin=(-5.0, -6.0, -100.0))
    volume = load_series(_only_series(tmp_path), RULES)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.8))
    assert volume.orientation == "SPL"
    np.testing.assert_allclose(volume.affine[:3, 3], (-5.0, -6.0, -100.0), atol=1e-3)


def test_order_comes_from_positions_not_file_names(tmp_path: Path) -> None:
    hu = tiny_hu(depth=10)
    files = write_series(tmp_path / "s", hu)
    names = [f"{random.Random(1).random():.6f}" for _ in files]
    shuffled = list(range(len(files)))
    random.Random(3).shuffle(shuffled)
    for path, k in zip(files, shuffled, strict=True):
        path.rename(path.with_name(f"x{k:03d}{names[0]}"))
    np.testing.assert_array_equal(load_series(_only_series(tmp_path / "s"), RULES).hu, hu)


def test_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    hu = tiny_hu()
    files = write_series(tmp_path, hu, signed=True)

    def shift(ds: pydicom.Dataset) -> None:  # same HU, stored differently: +24 stored, -24 intercept
        ds.PixelData = (ds.pixel_array.astype(np.int16) + 24).tobytes()
        ds.RescaleIntercept = float(ds.RescaleIntercept) - 24

    edit(files[3], shift)
    np.testing.assert_array_equal(load_series(_only_series(tmp_path), RULES).hu, hu)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decode_like_uncompressed(tmp_path: Path, syntax: str) -> None:
    hu = tiny_hu(depth=4, size=64)  # OpenJPEG needs at least 32 pixels per side for its default levels
    for path in write_series(tmp_path, hu, signed=True):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert {h.transfer_syntax for h in _only_series(tmp_path).instances} == {str(syntax)}
    np.testing.assert_array_equal(load_series(_only_series(tmp_path), RULES).hu, hu)


def test_one_missing_slice_is_resampled_and_says_why(tmp_path: Path) -> None:
    hu = tiny_hu(depth=10)
    files = write_series(tmp_path, hu)  # HFS: file k holds slice depth-1-k
    files[4].unlink()  # slice 5 (0-based) is missing
    series = _only_series(tmp_path)
    plan = plan_series(series, RULES)
    assert plan.resample and plan.n_slices == 10
    assert plan.notes == ("resampled to uniform 2.50 mm slices by linear interpolation as 1 slice is missing "
                          "(largest gap 5.00 mm after slice 5 of 9; median spacing 2.50 mm)",)
    volume = load_series(series, plan=plan)
    assert volume.shape == (10, 16, 16)
    np.testing.assert_array_equal(volume.hu[:5], hu[:5])
    np.testing.assert_array_equal(volume.hu[6:], hu[6:])
    np.testing.assert_allclose(volume.hu[5], (hu[4] + hu[6]) / 2)


def test_choose_per_study_prefers_thinnest_then_most_slices(tmp_path: Path) -> None:
    write_series(tmp_path / "thick", tiny_hu(depth=5), (5.0, 0.7, 0.7), series_number=3)
    write_series(tmp_path / "thin", tiny_hu(depth=10), (2.5, 0.7, 0.7), series_number=4)
    write_series(tmp_path / "thin_short", tiny_hu(depth=6), (2.5, 0.7, 0.7), series_number=5)
    series = index_tree(tmp_path).series
    assert len(series) == 3
    candidates = [(s, plan_series(s, RULES)) for s in series]
    chosen = choose_per_study(candidates)
    winner = {s.series_uid: p for s, p in candidates}[next(iter(set(chosen.values())))]
    assert len(set(chosen.values())) == 1 and winner.spacing_mm == pytest.approx(2.5) and winner.n_slices == 10


def test_two_series_mixed_in_one_folder_are_separated(tmp_path: Path) -> None:
    write_series(tmp_path, tiny_hu(depth=6, seed=1), series_number=2)
    write_series(tmp_path, tiny_hu(depth=7, seed=2), series_number=3, patient="PAT-2")
    series = index_tree(tmp_path).series
    assert sorted(len(s.instances) for s in series) == [6, 7]
    for s in series:
        assert load_series(s, RULES).shape[0] == len(s.instances)


# ----------------------------------------------------------------------------------------- bad input

def _del(*keywords: str):
    def change(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
    return change


def _set(**values):
    def change(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


def _no_decoder(ds: pydicom.Dataset) -> None:  # H.264: a transfer syntax pydicom has no decoder for
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.PixelData = encapsulate([ds.PixelData])


def _enhanced(ds: pydicom.Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.NumberOfFrames = 1


def _oblique(ds: pydicom.Dataset) -> None:
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    ds.ImageOrientationPatient = [1, 0, 0, 0, float(c), float(s)]


def _colour(ds: pydicom.Dataset) -> None:
    ds.PixelData = np.repeat(ds.pixel_array[..., None], 3, axis=-1).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0


def _smaller(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.pixel_array[:8, :8].copy().tobytes()
    ds.Rows = ds.Columns = 8


# (id, which files to change: "all" | index, change, rules, code, message fragment)
BAD_SERIES = [
    ("no-pixel-data", "all", _del("PixelData"), RULES, "no-pixel-data",
     "all 8 instances have no (7FE0,0010) 'Pixel Data'"),
    ("missing-position", 3, _del("ImagePositionPatient"), RULES, "no-geometry",
     "1 of 8 instances has no valid (0020,0032) 'Image Position (Patient)'"),
    ("missing-orientation", "all", _del("ImageOrientationPatient"), RULES, "no-geometry",
     "(0020,0037) 'Image Orientation (Patient)'"),
    ("no-rescale", 2, _del("RescaleIntercept"), RULES, "no-rescale",
     "1 of 8 instances has no (0028,1052) 'Rescale Intercept'"),
    ("scout", "all", _set(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), RULES, "scout", "LOCALIZER"),
    ("mr", "all", _set(Modality="MR"), RULES, "not-ct", "'Modality' is 'MR', not 'CT'"),
    ("no-decoder", "all", _no_decoder, RULES, "no-decoder",
     "compressed with transfer syntax 1.2.840.10008.1.2.4.102 (MPEG-4 AVC/H.264 High Profile / Level 4.1), for "
     "which pydicom has no decoder"),
    ("enhanced-without-groups", "all", _enhanced, RULES, "enhanced-ct",
     "multi-frame CT object without (5200,9229) 'Shared' or (5200,9230) 'Per-Frame Functional Groups Sequence'"),
    ("oblique", "all", _oblique, RULES, "not-axial", "30.0 degrees from the patient's head-foot axis"),
    ("inconsistent-size", 0, _smaller, RULES, "inconsistent-series", "2 different (0028,0010) 'Rows'"),
    ("colour", "all", _colour, RULES, "not-grayscale", "'Samples per Pixel'"),
    ("dose-screen-as-ct", "all", _set(SOPClassUID="1.2.840.10008.5.1.4.1.1.7"), RULES, "not-ct-image",
     "not (Enhanced) CT Image Storage"),
    ("too-few", "all", lambda ds: None, SeriesRules(min_slices=32), "too-few-slices",
     "only 8 slices; at least 32 are needed"),
]


@pytest.mark.parametrize("which,change,rules,code,fragment", [c[1:] for c in BAD_SERIES],
                         ids=[c[0] for c in BAD_SERIES])
def test_bad_series_rejected_with_specific_reason(tmp_path: Path, which, change, rules, code, fragment) -> None:
    files = write_series(tmp_path, tiny_hu())
    for path in files if which == "all" else [files[which]]:
        edit(path, change)
    with pytest.raises(SeriesRejected) as err:
        load_series(_only_series(tmp_path), rules)
    assert err.value.code == code
    assert fragment in str(err.value)
    assert isinstance(err.value, InvalidSeriesError) and code in REJECTION_CODES
    assert "PAT-1" not in str(err.value) and str(tmp_path) not in str(err.value)


def test_missing_decoder_plugin_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hu = tiny_hu(depth=4, size=64)
    for path in write_series(tmp_path, hu, signed=True):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)

    class Unavailable:  # what pydicom reports when e.g. pylibjpeg-rle is not installed
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-rle>=2.0"]  # Decoder.missing_dependencies

    from pydicom import pixels

    monkeypatch.setattr(pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(SeriesRejected, match=r"compressed as RLE Lossless .* no installed decoder can read it; "
                                             r"install one of the plugins "
                                             r"\(pylibjpeg - requires pylibjpeg-rle>=2.0\)") as err:
        plan_series(_only_series(tmp_path), RULES)
    assert err.value.code == "no-decoder"


def _positions(files: list[Path], z_of: dict[int, float]) -> None:
    for k, z in z_of.items():
        edit(files[k], lambda ds, z=z: setattr(ds, "ImagePositionPatient", [-5.0, -5.0, z]))


def test_duplicate_positions(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu())
    z_other = _z(pydicom.dcmread(files[3]))
    _positions(files, {2: z_other})
    with pytest.raises(SeriesRejected, match=r"1 pair of different slices share one position") as err:
        plan_series(_only_series(tmp_path), RULES)
    assert err.value.code == "duplicate-positions"


def test_same_instance_copied_twice_is_kept_once(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu())
    shutil.copy(files[2], tmp_path / "copy.dcm")
    plan = plan_series(_only_series(tmp_path), RULES)
    assert len(plan.order) == 8 and plan.notes == ("ignored 1 extra copy of the same instance",)


def test_missing_slice_rejected_when_policy_is_reject(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu(depth=10))
    files[4].unlink()
    with pytest.raises(SeriesRejected, match=r"1 slice is missing .* and data.irregular-spacing is 'reject'") as err:
        plan_series(_only_series(tmp_path), SeriesRules(min_slices=4, irregular_spacing="reject"))
    assert err.value.code == "missing-slices"


def test_two_adjacent_missing_slices_are_not_bridged(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu(depth=12))
    files[4].unlink()
    files[5].unlink()
    with pytest.raises(SeriesRejected, match=r"2 slices are missing .*not resampled as a gap is over 2 times"):
        plan_series(_only_series(tmp_path), RULES)


def test_non_uniform_spacing(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu(depth=10))
    z = _z(pydicom.dcmread(files[4]))
    _positions(files, {4: z + 1.0})  # 2.5 mm gaps become 3.5 and 1.5
    with pytest.raises(SeriesRejected, match=r"2 of 9 slice gaps differ from the median by more than 10%") as err:
        plan_series(_only_series(tmp_path), RULES)
    assert err.value.code == "irregular-spacing" and "more than 10% of the gaps are irregular" in str(err.value)


def test_tilted_gantry(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu())
    for path in files:
        edit(path, lambda ds: setattr(ds, "ImagePositionPatient",
                                      [-5.0, -5.0 + 0.5 * (_z(ds) + 100.0) / 2.5, _z(ds)]))
    with pytest.raises(SeriesRejected, match=r"drift 3.5 mm sideways .*gantry tilt about") as err:
        plan_series(_only_series(tmp_path), RULES)
    assert err.value.code == "tilted"


def test_real_files_without_ct_images() -> None:
    truncated = read_header(get_testdata_file("MR_truncated.dcm"))  # pixel data 62 bytes short
    assert truncated.pixel_data_truncated and truncated.modality == "MR"
    report = read_header(get_testdata_file("reportsi.dcm"))  # a structured report: no pixel data
    assert not report.has_pixel_data and report.modality == "SR"
    assert not read_header(get_testdata_file("CT_small.dcm")).pixel_data_truncated


@pytest.mark.skipif(get_testdata_file("liver.dcm", download=False) is None,
                    reason="pydicom-data is not installed (pip install pydicom-data): no multi-frame liver CT")
def test_pydicom_data_multiframe_liver_ct_is_indexed_by_frame(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("liver.dcm", download=False), tmp_path / "liver.dcm")
    series = _only_series(tmp_path)
    frames = int(pydicom.dcmread(tmp_path / "liver.dcm", stop_before_pixels=True).NumberOfFrames)
    assert len(series.instances) == frames and series.instances[-1].frame == frames - 1
    try:  # a few abdominal frames: too few slices, or a volume; never an unexpected error
        assert load_series(series, SeriesRules(min_slices=2)).shape[0] >= 2
    except SeriesRejected as exc:
        assert exc.code in REJECTION_CODES


def test_truncated_pixel_data_is_found_from_headers(tmp_path: Path) -> None:
    files = write_series(tmp_path, tiny_hu())
    data = files[5].read_bytes()
    files[5].write_bytes(data[:-100])
    assert read_header(files[5]).pixel_data_truncated
    with pytest.raises(SeriesRejected, match=r"1 of 8 instances is truncated") as err:
        plan_series(_only_series(tmp_path), RULES)
    assert err.value.code == "truncated"


@pytest.mark.parametrize("content,code,fragment", [
    (b"hello, not an image\n", "not-dicom", "not a DICOM file"),
    ("truncated-header", "truncated", "truncated"),
])
def test_bad_files_are_skipped_with_reason(tmp_path: Path, content, code, fragment) -> None:
    files = write_series(tmp_path / "s", tiny_hu())
    bad = tmp_path / "s" / "bad"
    bad.write_bytes(files[0].read_bytes()[:300] if content == "truncated-header" else content)
    index = index_tree(tmp_path)
    assert [(s.path, s.code) for s in index.skipped] == [(str(bad), code)]
    assert fragment in index.skipped[0].message and len(index.series[0].instances) == 8


def test_empty_folder_and_unreadable_file(tmp_path: Path) -> None:
    write_series(tmp_path / "s", tiny_hu())
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    locked = tmp_path / "s" / "locked.dcm"
    shutil.copy(next((tmp_path / "s").iterdir()), locked)
    locked.chmod(0)
    (tmp_path / "s" / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")  # unreadable even for root
    try:
        index = index_tree(tmp_path)
    finally:
        locked.chmod(0o600)
    codes = {Path(s.path).name: s.code for s in index.skipped}
    assert codes.pop("empty") == "empty-folder"  # reported once, not once per nested folder
    assert codes.pop("dangling.dcm") == "unreadable"
    message = next(s.message for s in index.skipped if s.path.endswith("dangling.dcm"))
    assert message == "it cannot be read (No such file or directory)"
    if os.geteuid() != 0:  # root reads files whatever their mode
        assert codes == {"locked.dcm": "unreadable"}


def test_index_of_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidSeriesError, match=r"as it is not a folder"):
        index_tree(tmp_path / "nope")


def test_series_rules_reject_bad_values() -> None:
    with pytest.raises(ValueError, match=r"irregular_spacing should be 'resample' or 'reject', got 'fix'"):
        SeriesRules(irregular_spacing="fix")
    with pytest.raises(ValueError, match=r"spacing_tolerance should be in the range \(0, 1\), got 1.5"):
        SeriesRules(spacing_tolerance=1.5)


def test_parallel_header_reading_gives_the_same_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lungmae_core.dicom.index as dicom_index

    write_series(tmp_path / "a", tiny_hu(depth=6))
    write_series(tmp_path / "b", tiny_hu(depth=5), patient="PAT-2")
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr(dicom_index, "_PARALLEL_MIN_FILES", 1)
    assert index_tree(tmp_path, workers=2) == index_tree(tmp_path, workers=1)
    assert len(index_tree(tmp_path, workers=2).skipped) == 1


def test_pydicom_value_warnings_do_not_reach_logs_above_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              recwarn: pytest.WarningsRecorder) -> None:
    files = write_series(tmp_path, tiny_hu(depth=4))
    for path in files:  # values pydicom complains about, quoting them
        edit(path, _set(PatientName="SECRET" * 12, StudyInstanceUID="1.2.3.4.5secretuid"))
    recwarn.clear()
    caplog.clear()  # pydicom also complained while the test wrote the values
    caplog.set_level("INFO")
    series = _only_series(tmp_path)
    load_series(series, RULES)
    assert series.study_uid == "1.2.3.4.5secretuid"  # still read, just not shouted
    assert "secret" not in caplog.text.lower()
    assert not [w for w in recwarn if "secret" in str(w.message).lower()]
    caplog.clear()
    caplog.set_level("DEBUG", logger="lungmae_core.dicom")
    read_header(files[0])
    assert "Invalid value for VR UI" in caplog.text  # kept for debugging, at DEBUG only


@pytest.mark.parametrize("frame_order,per_frame_rescale", [(None, False), ([5, 2, 7, 0, 1, 3, 6, 4], True)])
def test_enhanced_ct_frames_assemble_like_classic_slices(tmp_path: Path, frame_order, per_frame_rescale) -> None:
    hu = tiny_hu()
    write_enhanced(tmp_path, hu, (2.5, 0.7, 0.8), frame_order=frame_order, per_frame_rescale=per_frame_rescale)
    series = _only_series(tmp_path)
    assert len(series.instances) == 8 and {i.frame for i in series.instances} == set(range(8))
    volume = load_series(series, RULES)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.8)) and volume.orientation == "SPL"


def test_enhanced_ct_frame_without_position_is_named(tmp_path: Path) -> None:
    path = write_enhanced(tmp_path, tiny_hu())
    edit(path, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[3], "PlanePositionSequence"))
    with pytest.raises(SeriesRejected, match=r"1 of 8 frames has no valid \(0020,0032\) 'Image Position \(Patient\)'"):
        plan_series(_only_series(tmp_path), RULES)
