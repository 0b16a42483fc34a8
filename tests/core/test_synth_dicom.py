"""Synthetic hospitals: valid CT Image Storage (dciodvfy), scanner differences, determinism, exact round trip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungmae_core.dicom import SeriesRejected, SeriesRules, index_tree, load_series, plan_series
from lungmae_core.synthetic.dicom_writer import make_study, write_ct_series, write_site
from lungmae_core.synthetic.phantoms import generate_phantom
from lungmae_core.synthetic.scanners import scanner_for_site

SHAPE = (24, 48, 48)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """A two-study synthetic site with the feet-first Philips profile (site 2), small series."""
    return write_site(tmp_path_factory.mktemp("site") / "site2", site_index=2, n_scans=2, seed=5, shape=SHAPE)


def _errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed: apt-get install dicom3tools")
def test_every_kind_of_file_passes_dciodvfy(site) -> None:
    study_dir = site.scans[0].series_dir.parent
    ct = sorted(site.scans[0].series_dir.iterdir())
    for path in (ct[0], ct[-1], study_dir / "SE000001" / "IM000001.dcm", study_dir / "DOSE" / "IM000001.dcm"):
        assert _errors(path) == [], path


def test_site_tree_holds_ct_scout_dose_screen_text_and_labels(site) -> None:
    index = index_tree(site.dicom_dir)
    assert [Path(s.path).name for s in index.skipped] == ["EXPORT.TXT"]
    kinds = {}
    for series in index.series:
        try:
            plan_series(series, SeriesRules(min_slices=16))
            kinds["ct"] = kinds.get("ct", 0) + 1
        except SeriesRejected as exc:
            kinds[exc.code] = kinds.get(exc.code, 0) + 1
    assert kinds == {"ct": 2, "scout": 2, "not-ct": 1}
    lines = site.labels_csv.read_text().splitlines()
    assert lines[0] == "patient_id,label"
    assert sorted(lines[1:]) == sorted(f"{s.patient_id},{s.label}" for s in site.scans)


def test_feet_first_headers_and_scanner_profile_show(site) -> None:
    scanner = scanner_for_site(2)
    files = sorted(site.scans[0].series_dir.iterdir())
    first, last = pydicom.dcmread(files[0]), pydicom.dcmread(files[-1])
    assert first.PatientPosition == "FFS" and scanner.patient_position == "FFS"
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    assert float(first.ImagePositionPatient[2]) < float(last.ImagePositionPatient[2])  # numbered from the feet
    assert first.Manufacturer == scanner.manufacturer and first.ManufacturerModelName == scanner.model
    assert float(first.SliceThickness) == pytest.approx(scanner.slice_thickness_mm)
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.Modality == "CT"


def test_series_reads_back_as_the_phantom(site) -> None:
    scan = site.scans[1]
    series = next(s for s in index_tree(scan.series_dir).series)
    volume = load_series(series, SeriesRules(min_slices=16))
    phantom = generate_phantom(scan.label, seed=5 * 100_003 + 2 * 1_009 + 1, scanner=scanner_for_site(2),
                               shape=SHAPE)
    assert volume.orientation == "SPL" and volume.shape == SHAPE
    np.testing.assert_allclose(volume.spacing_mm, phantom.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(volume.hu, np.clip(np.rint(phantom.hu), -32768, 32767), atol=0)


def test_same_seed_same_files_and_unsigned_storage(tmp_path: Path) -> None:
    hu = np.linspace(-1024, 1000, 4 * 32 * 32, dtype=np.float32).reshape(4, 32, 32)
    study = make_study(1, 0, seed=3)
    scanner = scanner_for_site(1)  # GE profile: 12-bit unsigned values with intercept -1024
    a = write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "a", study=study, scanner=scanner)
    b = write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "b", study=study, scanner=scanner)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    ds = pydicom.dcmread(a[0])
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024.0 and ds.BitsStored == 12
    assert make_study(1, 0, seed=3) == study and make_study(1, 1, seed=3).study_uid != study.study_uid


def test_write_site_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"n_scans should be at least 1, got 0"):
        write_site(tmp_path, site_index=0, n_scans=0)
    with pytest.raises(ValueError, match=r"labelled_fraction should be in \[0, 1\], got 1.5"):
        write_site(tmp_path, site_index=0, n_scans=1, labelled_fraction=1.5)


def test_sites_written_in_parallel_equal_sites_written_one_by_one(tmp_path: Path) -> None:
    from client.site_config import load_site_config
    from lungmae_cli.synth import write_synthetic_sites

    kwargs = dict(sites=2, scans_per_site=2, seed=4, shape=SHAPE, preprocess_size=32)
    pooled = write_synthetic_sites(tmp_path / "pooled", workers=2, **kwargs)
    serial = write_synthetic_sites(tmp_path / "serial", workers=1, **kwargs)
    assert [p.relative_to(tmp_path / "pooled") for p in pooled] == [p.relative_to(tmp_path / "serial") for p in serial]
    for a, b in zip(pooled, serial, strict=True):
        files_a = sorted(p.relative_to(a.parent) for p in (a.parent / "dicom").rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b.parent) for p in (b.parent / "dicom").rglob("*") if p.is_file())
        assert files_a == files_b and len(files_a) == 2 * (SHAPE[0] + 1) + 2
        assert all((a.parent / f).read_bytes() == (b.parent / f).read_bytes() for f in files_a)
        cfg = load_site_config(a)
        assert cfg.data.input == a.parent / "dicom" and cfg.data.labels == a.parent / "labels.csv"
        assert cfg.preprocess.size == 32 and cfg.data.min_slices == min(32, SHAPE[0])


# A second thread writes DICOM while the first is still inside pydicom/__init__ (held there by a slow import of
# pydicom.examples, which __init__ runs after pydicom.dataset and before it defines pydicom.dcmwrite).
_RACE = """
import importlib.abc, sys, threading, time
import numpy as np

class SlowExamples(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pydicom.examples":
            time.sleep(1.5)
        return None

sys.meta_path.insert(0, SlowExamples())
from lungmae_core.synthetic.dicom_writer import make_study, write_ct_series
from lungmae_core.synthetic.scanners import scanner_for_site

first = threading.Thread(target=lambda: __import__("pydicom"))
first.start()
time.sleep(0.5)
write_ct_series(np.zeros((2, 8, 8), np.float32), (1.0, 1.0, 1.0), sys.argv[1], study=make_study(0, 0, 0),
                scanner=scanner_for_site(0))
first.join()
print("written")
"""


def test_writing_while_another_thread_still_imports_pydicom(tmp_path: Path) -> None:
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _RACE, str(tmp_path / "series")], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "written" in out.stdout, out.stderr[-2000:]
    assert len(list((tmp_path / "series").glob("*.dcm"))) == 2
