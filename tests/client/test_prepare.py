"""prepare_site and the two commands on a small synthetic hospital with every kind of bad input mixed in."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from client.prepare import prepare_site
from client.site_config import SiteConfig, load_site_config, site_config_from_mapping
from lungmae_cli.main import main
from lungmae_core.manifest import read_manifest
from lungmae_core.synthetic.dicom_writer import make_study, write_ct_series, write_site
from lungmae_core.synthetic.phantoms import generate_phantom
from lungmae_core.synthetic.scanners import scanner_for_site
from tests.dicom_factory import tiny_hu, write_series

SHAPE = (40, 64, 64)


def _head_ct() -> np.ndarray:
    """A head-like volume: soft tissue in a bone shell, no lungs."""
    d, h, w = np.meshgrid(np.arange(40), np.arange(64), np.arange(64), indexing="ij")
    r = ((d - 20) / 18.0) ** 2 + ((h - 32) / 28.0) ** 2 + ((w - 32) / 24.0) ** 2
    hu = np.where(r < 1, 40.0, -1000.0).astype(np.float32)
    hu[(r < 1) & (r > 0.8)] = 700.0
    return hu


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A site with 3 synthetic studies plus bad input of every kind, prepared once with 2 workers."""
    root = tmp_path_factory.mktemp("hospital")
    site = write_site(root, site_index=0, n_scans=3, seed=2, shape=SHAPE)
    dicom = site.dicom_dir
    # Another, thicker series of the first study: eligible, but the thin one must be chosen.
    first = site.scans[0]
    phantom = generate_phantom(first.label, seed=2 * 100_003, scanner=scanner_for_site(0), shape=SHAPE)
    write_ct_series(phantom.hu[::2], phantom.spacing_mm * (2, 1, 1), first.series_dir.parent / "SE000003",
                    study=make_study(0, 0, 2), scanner=scanner_for_site(0), series_number=3)
    # A head CT (no lungs), an MR series, a truncated file, an empty folder, a NIfTI chest.
    write_series(dicom / "HEAD", _head_ct(), (4.0, 3.0, 3.0), patient="HEAD-PATIENT")
    for path in write_series(dicom / "MR", tiny_hu(), patient="MR-PATIENT"):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    ct_file = sorted(first.series_dir.iterdir())[0]
    (dicom / "broken.dcm").write_bytes(ct_file.read_bytes()[:700])
    (dicom / "EMPTY").mkdir()
    nifti_phantom = generate_phantom("ggo", seed=99, scanner=scanner_for_site(1), shape=SHAPE)
    data = np.transpose(nifti_phantom.hu, (2, 1, 0))  # (W, H, D): i to the patient's left
    sd, sh, sw = nifti_phantom.spacing_mm
    nib.save(nib.Nifti1Image(data, np.diag([-sw, -sh, sd, 1.0])), str(root / "dicom" / "NIFTI001.nii.gz"))
    labels = root / "labels.csv"
    labels.write_text(site.labels_csv.read_text() + "NIFTI001,ggo\nGHOST-PATIENT,normal\nHEAD-PATIENT,fibrosiss\n")
    cfg = site_config_from_mapping({"site": {"name": "hosp"}, "data": {"input": str(dicom), "labels": str(labels),
                                                                        "cache": str(root / "cache"), "workers": 2,
                                                                        "min-slices": 16},
                                    "preprocess": {"size": 32}})
    report = prepare_site(cfg, progress=False)
    return {"root": root, "site": site, "cfg": cfg, "report": report, "cache": root / "cache"}


def _reasons(cache: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in read_manifest(cache):
        out.setdefault(row.status if row.accepted else row.reason.split(":")[0], []).append(row.source)
    return {key: sorted(sources) for key, sources in out.items()}


def test_every_series_gets_a_row_and_a_specific_reason(hospital) -> None:
    report = hospital["report"]
    assert _reasons(hospital["cache"]) == {
        "accepted": ["dicom", "dicom", "dicom", "nifti"],
        "scout": ["dicom"] * 3, "not-ct": ["dicom", "dicom"],  # the MR series and the dose screen
        "not-chosen": ["dicom"], "implausible-lungs": ["dicom"], "not-dicom": ["file"], "truncated": ["file"],
        "empty-folder": ["folder"],
    }
    assert report.accepted == 4 and report.rejected == 10 and report.processed == 4 and report.reused == 0
    assert report.rejections == {"scout": 3, "not-ct": 2, "not-chosen": 1, "implausible-lungs": 1, "not-dicom": 1,
                                 "truncated": 1, "empty-folder": 1}
    rows = {r.reason.split(":")[0]: r for r in read_manifest(hospital["cache"]) if not r.accepted}
    assert "no air region inside the body" in rows["implausible-lungs"].reason
    assert "'Modality' is 'MR'" in rows["not-ct"].reason or "'Modality' is 'OT'" in rows["not-ct"].reason
    assert "of the same study was chosen instead (rule: thinnest slices" in rows["not-chosen"].reason


def test_accepted_rows_have_samples_qc_labels_and_splits(hospital) -> None:
    accepted = [r for r in read_manifest(hospital["cache"]) if r.accepted]
    expected_labels = sorted([s.label for s in hospital["site"].scans] + ["ggo"])
    assert sorted(r.label for r in accepted) == expected_labels
    for row in accepted:
        assert (hospital["cache"] / row.cache_file).is_file() and row.cache_file == f"samples/{row.cache_key}.npz"
        assert row.split in ("train", "val", "test") and row.lung_volume_ml > 500
        assert row.n_slices in (40,) and -1000 < row.hu_p50 < -500
        assert row.patient_id.startswith("pat-") and row.series_id.startswith("ser-")
    assert {r.split for r in accepted} >= {"train"}
    nifti = next(r for r in accepted if r.source == "nifti")
    assert nifti.spacing_d_mm == pytest.approx(scanner_for_site(1).extent_mm[0] / 40)


def test_nothing_identifying_leaves_in_manifest_datacard_or_label_report(hospital) -> None:
    from lungmae_core.dicom import index_tree

    secrets = {str(hospital["root"]), "HEAD-PATIENT", "MR-PATIENT", "GHOST-PATIENT", "NIFTI001"}
    for series in index_tree(hospital["site"].dicom_dir).series:
        for inst in series.instances[:2]:
            ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
            secrets |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber,
                        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    secrets.discard("")
    for name in ("manifest.csv", "datacard.json", "label-issues.csv"):
        text = (hospital["cache"] / name).read_text()
        leaked = [s for s in secrets if s in text]
        assert leaked == [], (name, leaked)
    assert "ser-" not in (hospital["cache"] / "datacard.json").read_text()  # aggregates only, no ids at all
    summary = hospital["report"].summary()
    assert not [s for s in secrets if s in summary.replace(str(hospital["cache"]), "")]


def test_datacard_holds_aggregates(hospital) -> None:
    card = json.loads((hospital["cache"] / "datacard.json").read_text())
    assert card["counts"] == {"rows": 14, "series": 11, "accepted": 4, "rejected": 10, "patients": 4, "studies": 4,
                              "labelled": 4, "unlabelled": 0}
    assert card["rejections"]["scout"] == 3 and card["manufacturers"] == {"SIEMENS": 3, "unknown": 1}
    assert sum(card["labels"].values()) == 4 and sum(card["splits"].values()) == 4
    for name, histogram in card["histograms"].items():
        assert sum(histogram.values()) == 4, name
    assert card["label_issues"]["unknown-class"] == 1 and card["label_issues"]["missing-from-images"] == 1
    assert card["preprocess"]["size"] == 32


def test_label_problems_are_reported_by_line(hospital) -> None:
    messages = [i.message for i in hospital["report"].label_issues]
    assert messages == [
        "line 7: class 'fibrosiss' is not one of normal, ggo, fibrosis, emphysema; row ignored",
        "line 6: this patient is labelled but no series of the input belongs to it; check the export or the id",
    ]
    with open(hospital["cache"] / "label-issues.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["line"], r["kind"]) for r in rows] == [("6", "missing-from-images"), ("7", "unknown-class")]


def test_rerun_reuses_and_redoes_only_what_changed(hospital, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(hospital["cache"], cache)
    cfg: SiteConfig = hospital["cfg"].with_data(cache=cache, workers=1)
    again = prepare_site(cfg, progress=False)
    assert (again.processed, again.reused, again.accepted) == (0, 4, 4)
    assert again.rejections == hospital["report"].rejections  # the head CT is remembered, not recomputed
    assert len(list((cache / "rejections").iterdir())) == 1
    assert [r for r in read_manifest(cache)] == [r for r in read_manifest(hospital["cache"])]

    touched = sorted(hospital["site"].scans[1].series_dir.iterdir())[3]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        partly = prepare_site(cfg, progress=False)
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (partly.processed, partly.reused) == (1, 3)

    bigger = prepare_site(site_config_from_mapping({"data": {"input": str(cfg.data.input), "cache": str(cache),
                                                             "labels": str(cfg.data.labels), "workers": 1},
                                                    "preprocess": {"size": 24}}), progress=False)
    assert (bigger.processed, bigger.reused, bigger.accepted) == (4, 0, 4)
    assert bigger.removed == 5  # the 4 samples made at size 32 and the remembered refusal
    assert len(list((cache / "samples").iterdir())) == 4 and "Removed 5 cached file(s)" in bigger.summary()
    first_accepted = next(r for r in read_manifest(cache) if r.accepted)
    with np.load(cache / first_accepted.cache_file) as sample:
        assert sample["image"].shape == (1, 24, 24, 24)
    assert not list((cache / "samples").glob(".*.tmp"))


def test_cli_synth_then_prepare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["synth", "--out", str(tmp_path), "--sites", "1", "--scans-per-site", "1", "--slices", "40",
                 "--matrix", "64", "--workers", "1", "--preprocess-size", "24"]) == 0
    out = capsys.readouterr().out
    assert "site0: 1 studies (100% labelled), SIEMENS" in out and "lungmae site prepare --config" in out
    cfg = load_site_config(tmp_path / "site0" / "site.yaml")
    assert cfg.site.name == "site0" and cfg.preprocess.size == 24 and cfg.data.input.is_dir()
    assert main(["site", "prepare", "--config", str(tmp_path / "site0" / "site.yaml"), "--workers", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Prepared 4 series/files" in out and "1 accepted" in out
    assert "     1  scout: its (0008,0008) 'Image Type' says LOCALIZER" in out
    assert (tmp_path / "site0" / "cache" / "manifest.csv").is_file()


def test_cli_with_nothing_usable_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in" / "empty").mkdir(parents=True)
    (tmp_path / "in" / "notes.txt").write_text("nothing here")
    code = main(["site", "prepare", "--input", str(tmp_path / "in"), "--cache", str(tmp_path / "c"),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "0 accepted" in out and "No series was accepted" in out
    assert "empty-folder: the folder holds no files" in out and "not-dicom" in out


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["site", "prepare", "--cache", str(tmp_path / "c")]) == 2
    assert "no input folder: pass --input or set 'data: input' in site.yaml" in capsys.readouterr().err
    assert main(["site", "prepare", "--input", str(tmp_path / "missing"), "--cache", str(tmp_path)]) == 2
    assert "as it is not a folder; check --input" in capsys.readouterr().err


def test_unexpected_error_is_reported_with_its_code_location_and_run_goes_on(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import lungmae_core.preprocess

    write_series(tmp_path / "in" / "a", tiny_hu(), patient="PAT-A")
    write_series(tmp_path / "in" / "b", tiny_hu(seed=1), patient="PAT-B", study_index=1)

    def boom(volume, cfg):
        raise TypeError("something /secret/path PAT-A")

    monkeypatch.setattr(lungmae_core.preprocess, "preprocess_volume", boom)
    cfg = site_config_from_mapping({"data": {"input": str(tmp_path / "in"), "cache": str(tmp_path / "c"),
                                             "workers": 1, "min-slices": 4}})
    report = prepare_site(cfg, progress=False)
    assert report.rejections == {"internal-error": 2}
    reason = read_manifest(tmp_path / "c")[0].reason
    assert reason.startswith("internal-error: TypeError at test_prepare.py:")
    assert " in boom while preparing it" in reason
    assert "secret" not in reason and "PAT-A" not in reason
    assert not (tmp_path / "c" / "rejections").exists()  # a bug is not remembered: the next run retries


def test_logs_name_problems_by_index_and_pseudonym_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scout = write_series(tmp_path / "in" / "scout", tiny_hu(depth=4), patient="PAT-SCOUT")
    broken = write_series(tmp_path / "in" / "broken", tiny_hu(), patient="PAT-BROKEN", study_index=1)
    for path in scout:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    ds = pydicom.dcmread(broken[2])
    del ds.ImagePositionPatient
    ds.save_as(broken[2])
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="client.prepare")  # `lungmae simulate` quiets it in-process
    cfg = site_config_from_mapping({"data": {"input": str(tmp_path / "in"), "cache": str(tmp_path / "c"),
                                             "workers": 1, "min-slices": 4}})
    report = prepare_site(cfg, progress=False)
    assert report.rejections == {"scout": 1, "no-geometry": 1}
    problems = [r.getMessage() for r in caplog.records if "Unable to use series" in r.getMessage()]
    assert len(problems) == 1 and problems[0].startswith("Unable to use series ")
    assert " of 2 (ser-" in problems[0] and "(0020,0032) 'Image Position (Patient)'" in problems[0]
    for raw in ("PAT-SCOUT", "PAT-BROKEN", str(tmp_path / "in"), pydicom.dcmread(broken[0]).SeriesInstanceUID):
        assert raw not in caplog.text
