"""Labels CSV: every problem is reported with its line, nothing is dropped silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.labels import read_labels
from lungmae_core.errors import SiteConfigError

CLASSES = ("normal", "ggo", "fibrosis", "emphysema")


def _read(tmp_path: Path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return read_labels(path, CLASSES)


@pytest.mark.parametrize("text,labels,issues", [
    ("patient_id,label\nA,normal\nB,Fibrosis\n", {"A": "normal", "B": "fibrosis"}, []),
    ("PatientID;Class\nA;ggo\n", {"A": "ggo"}, []),
    ("patient_id,label\nA,normal\nB,fibrosiss\n", {"A": "normal"},
     [(3, "unknown-class", "line 3: class 'fibrosiss' is not one of normal, ggo, fibrosis, emphysema; row ignored")]),
    ("patient_id,label\nA,normal\nA,normal\n", {"A": "normal"},
     [(3, "duplicate", "line 3: repeats line 2 (normal); used once")]),
    ("patient_id,label\nA,normal\nA,ggo\nA,normal\nB,ggo\n", {"B": "ggo"},
     [(3, "conflict", "line 3: gives 'ggo' but line 2 gave 'normal' for the same patient; left unlabelled until "
                      "fixed")]),
    ("patient_id,label\n,normal\n\nC,emphysema\n", {"C": "emphysema"},
     [(2, "empty-id", "line 2: the patient id is empty; row ignored")]),
])
def test_rows_and_issues(tmp_path: Path, text, labels, issues) -> None:
    table = _read(tmp_path, text)
    assert table.labels == labels
    assert [(i.line, i.kind, i.message) for i in table.issues] == issues


def test_study_and_accession_columns_and_pseudonyms(tmp_path: Path) -> None:
    assert _read(tmp_path, "StudyInstanceUID,diagnosis\n1.2.3,ggo\n").id_kind == "study"
    assert _read(tmp_path, "accession_number,class\nA77,ggo\n").id_kind == "accession"
    table = _read(tmp_path, "patient_id,label\npat-0123456789abcdef,ggo\n")
    assert table.lookup("RAW-ID", "pat-0123456789abcdef") == "ggo" and table.lookup("RAW-ID") is None


def test_unmatched_patients_are_reported(tmp_path: Path) -> None:
    table = _read(tmp_path, "patient_id,label\nA,normal\nB,ggo\nC,fibrosis\n")
    new = table.report_unmatched(matched={"A", "B"}, accepted={"A"})
    assert [(i.line, i.kind) for i in new] == [(3, "no-accepted-series"), (4, "missing-from-images")]
    assert new[1].message == ("line 4: this patient is labelled but no series of the input belongs to it; check the "
                              "export or the id")
    assert table.counts()["missing-from-images"] == 1 and table.counts()["conflict"] == 0


@pytest.mark.parametrize("text,message", [
    ("", "as it is empty; expected a header such as 'patient_id,label'"),
    ("name,label\nA,ggo\n", "has no id column; expected one of patient_id, study_uid, accession_number"),
    ("patient_id,grade\nA,ggo\n", "has no class column; expected one of label, class, diagnosis"),
])
def test_unusable_files(tmp_path: Path, text, message) -> None:
    with pytest.raises(SiteConfigError, match=message):
        _read(tmp_path, text)
    with pytest.raises(SiteConfigError, match=r"labels CSV .*missing.csv as it does not exist; fix data.labels"):
        read_labels(tmp_path / "missing.csv", CLASSES)
