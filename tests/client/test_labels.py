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


def test_every_label_outside_the_federation_classes_is_named_with_its_count(tmp_path: Path) -> None:
    """A registry that says UIP/NSIP where the federation says fibrosis: the site finds out at prepare."""
    table = _read(tmp_path, "patient_id,label\nA,UIP\nB,normal\nC,NSIP\nD,UIP\nE,uip\n")
    assert table.labels == {"B": "normal"}
    assert table.unknown_labels() == {"UIP": 2, "NSIP": 1, "uip": 1}


def test_prepare_summary_names_unknown_labels_and_counts_unlabelled(tmp_path: Path) -> None:
    from client.prepare import PrepareReport

    report = PrepareReport(
        cache_dir=tmp_path, manifest_path=tmp_path / "m.csv", datacard_path=tmp_path / "d.json", n_rows=5,
        accepted=5, rejected=0, reused=0, processed=5, rejections={}, examples={}, notes=(), label_issues=(),
        labelled=1, seconds=1.0, unlabelled=4, unknown_labels={"UIP": 2, "NSIP": 1}, classes=CLASSES)
    text = report.summary()
    assert "1 accepted series labelled, 4 unlabelled." in text
    assert ("Labels outside the federation's classes (normal, ggo, fibrosis, emphysema): 3 row(s) left unlabelled: "
            "'UIP' x2, 'NSIP' x1.") in text


def test_strict_labels_refuse_to_prepare_naming_each_unknown_label(tmp_path: Path) -> None:
    from client.prepare import prepare_site
    from client.site_config import site_config_from_mapping

    (tmp_path / "input").mkdir()
    (tmp_path / "labels.csv").write_text("patient_id,label\nA,UIP\nB,hp\nC,UIP\n")
    cfg = site_config_from_mapping({"data": {"input": "input", "cache": "cache", "labels": "labels.csv",
                                             "classes": ["normal", "fibrosis"], "strict-labels": True}},
                                   base_dir=tmp_path)
    with pytest.raises(SiteConfigError) as info:
        prepare_site(cfg, progress=False)
    assert ("labels outside the federation's classes (normal, fibrosis): 'UIP' (2 rows), 'hp' (1 rows)"
            in str(info.value))


def test_class_list_in_site_yaml_is_validated() -> None:
    from client.site_config import site_config_from_mapping

    with pytest.raises(SiteConfigError, match="'classes' must hold distinct names"):
        site_config_from_mapping({"data": {"classes": ["uip", "uip"]}})
    assert site_config_from_mapping({"data": {"classes": ["uip", "nsip", "hp"]}}).data.classes == ("uip", "nsip", "hp")
