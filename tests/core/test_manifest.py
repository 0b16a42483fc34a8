"""The site manifest CSV: round trip, atomic write, and errors that name the file, line and column."""

from __future__ import annotations

import pytest

from lungmae_core.errors import CacheError
from lungmae_core.manifest import MANIFEST_COLUMNS, ManifestRow, read_manifest, write_manifest

CONTRACT_COLUMNS = (
    "series_id, patient_id, study_id, source, status, reason, label, split, cache_file, cache_key, n_slices, rows, "
    "columns, spacing_d_mm, spacing_h_mm, spacing_w_mm, slice_thickness_mm, manufacturer, lung_volume_ml, hu_mean, "
    "hu_std, hu_p05, hu_p50, hu_p95")


def rows():
    return [
        ManifestRow(series_id="s2", patient_id="p1", study_id="t1", source="dicom", status="accepted", label="ggo",
                    split="train", cache_file="samples/ab.npz", cache_key="ab", n_slices=120, rows=512, columns=512,
                    spacing_d_mm=2.5, spacing_h_mm=0.7, spacing_w_mm=0.7, slice_thickness_mm=2.5,
                    manufacturer="GE, \"Revolution\"", lung_volume_ml=4321.5, hu_mean=-812.25, hu_std=120.0,
                    hu_p05=-930.0, hu_p50=-840.0, hu_p95=-500.0),
        ManifestRow(series_id="s1", patient_id="p2", study_id="t2", source="dicom", status="rejected",
                    reason="lung volume 120 mL is below the minimum of 500 mL", n_slices=40),
    ]


def test_columns_are_the_contract():
    assert MANIFEST_COLUMNS == tuple(c.strip() for c in CONTRACT_COLUMNS.split(","))


def test_round_trip_sorted_by_series(tmp_path):
    path = write_manifest(tmp_path, rows())
    assert path == tmp_path / "manifest.csv"
    assert path.read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    back = read_manifest(tmp_path)
    assert [r.series_id for r in back] == ["s1", "s2"]
    assert back[1] == rows()[0] and back[0] == rows()[1]
    assert back[0].lung_volume_ml is None and back[0].n_slices == 40 and not back[0].accepted
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


@pytest.mark.parametrize("kwargs,message", [
    ({"status": "maybe"}, "'status' must be one of accepted, rejected; got 'maybe'"),
    ({"status": "rejected"}, "a rejected series needs a 'reason'"),
    ({"status": "accepted"}, "an accepted series needs a 'cache_file' and no 'reason'"),
    ({"status": "rejected", "reason": "scout", "split": "holdout"}, "'split' must be empty or one of train, val, test"),
])
def test_row_rules(kwargs, message):
    with pytest.raises(CacheError) as exc:
        ManifestRow(series_id="s9", patient_id="p", study_id="t", source="dicom", **kwargs)
    assert message in str(exc.value)


def test_errors_name_file_line_and_column(tmp_path):
    write_manifest(tmp_path, rows())
    path = tmp_path / "manifest.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",120,", ",many,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CacheError) as exc:
        read_manifest(tmp_path)
    assert f"{path}: line 3, column 'n_slices' must be an integer or empty; got 'many'" in str(exc.value)

    path.write_text("series_id,status,colour\ns1,accepted,red\n")
    with pytest.raises(CacheError) as exc:
        read_manifest(tmp_path)
    message = str(exc.value)
    assert "header does not match" in message and "'colour'" in message and "'patient_id'" in message

    path.write_text(",".join(MANIFEST_COLUMNS) + "\ns1,p,t,dicom,accepted" + "," * 19 + "\n")
    with pytest.raises(CacheError, match="line 2: manifest row s1: an accepted series needs a 'cache_file'"):
        read_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(CacheError, match="manifest.csv as it does not exist; run `lungmae site prepare` first"):
        read_manifest(tmp_path)
