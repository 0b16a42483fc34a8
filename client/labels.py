"""The site's labels CSV: which ILD class each patient (or study, or accession number) has.

Hospitals write this file by hand or from a registry, so it has typos, repeated rows and patients whose
images were never exported. Nothing here is silently dropped: every problem becomes a :class:`LabelIssue`
that names the CSV line (never the identifier, which may be a real PatientID) and ends up in the
preparation report, the label report in the cache and, as counts, in the data card.

Format: a header row with one id column and one class column, e.g.::

    patient_id,label
    PAT0001,fibrosis
    PAT0002,normal

Id columns (first found wins): ``patient_id`` (matches (0010,0020) Patient ID), ``study_uid``
((0020,000D) Study Instance UID), ``accession_number`` ((0008,0050) Accession Number); aliases such as
``PatientID``, ``patient``, ``StudyInstanceUID`` and ``accession`` are accepted. Class column: ``label``,
``class`` or ``diagnosis``. Ids may also be the site's pseudonyms (``pat-...``, ``stu-...``). Class names are
matched case-insensitively against the federation's class list (``site.yaml`` ``data: classes``); every
label outside it is named with its count (:meth:`LabelTable.unknown_labels`), so a site whose registry
uses other names finds out at ``site prepare``, not after a federation that trained on one class.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from lungmae_core.errors import SiteConfigError, read_text

__all__ = ["LabelIssue", "LabelTable", "read_labels", "ID_COLUMNS", "LABEL_COLUMNS", "ISSUE_KINDS"]

ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient": ("patient_id", "patientid", "patient", "pseudonym", "patient_pseudonym"),
    "study": ("study_uid", "studyinstanceuid", "study_instance_uid", "study_id", "study"),
    "accession": ("accession_number", "accessionnumber", "accession"),
}
LABEL_COLUMNS = ("label", "class", "diagnosis", "class_name")
ISSUE_KINDS = ("unknown-class", "empty-id", "duplicate", "conflict", "missing-from-images", "no-accepted-series")


@dataclasses.dataclass(frozen=True)
class LabelIssue:
    """One problem in the labels CSV.

    Args:
        line: 1-based line number in the CSV (the header is line 1).
        kind: one of :data:`ISSUE_KINDS`.
        message: what is wrong and what was done about it, without the identifier.
    """

    line: int
    kind: str
    message: str


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


@dataclasses.dataclass
class LabelTable:
    """The usable labels of a CSV plus every issue found while reading and matching it.

    Args:
        id_kind: ``"patient"``, ``"study"`` or ``"accession"``: which DICOM identifier the ids match.
        labels: ``{id: class name}`` for ids with one valid class.
        lines: ``{id: first CSV line}`` for every id with a valid class (conflicts included).
        issues: problems found so far (reading adds some, :meth:`report_unmatched` the rest).
    """

    source: str
    id_kind: str
    labels: dict[str, str]
    lines: dict[str, int]
    issues: list[LabelIssue]
    unknown: dict[str, int] = dataclasses.field(default_factory=dict)

    def lookup(self, *keys: str) -> str | None:
        """The class of the first of ``keys`` (raw id or pseudonym) that has a label, else None."""
        for key in keys:
            if key and key in self.labels:
                return self.labels[key]
        return None

    def report_unmatched(self, matched: Iterable[str], accepted: Iterable[str]) -> list[LabelIssue]:
        """Add issues for labelled ids never seen in the images, or seen only in rejected series.

        Args:
            matched: ids (as written in the CSV) that matched at least one series.
            accepted: ids that matched at least one accepted series.

        Returns:
            The new issues (also appended to :attr:`issues`).
        """
        matched, accepted = set(matched), set(accepted)
        new: list[LabelIssue] = []
        for key, line in sorted(self.lines.items(), key=lambda kv: kv[1]):
            if key not in self.labels:
                continue  # a conflict, already reported
            if key not in matched:
                new.append(LabelIssue(line, "missing-from-images",
                                      f"line {line}: this {self.id_kind} is labelled but no series of the input "
                                      "belongs to it; check the export or the id"))
            elif key not in accepted:
                new.append(LabelIssue(line, "no-accepted-series",
                                      f"line {line}: this {self.id_kind} is labelled but all its series were "
                                      "rejected (see manifest.csv)"))
        self.issues.extend(new)
        return new

    def unknown_labels(self) -> dict[str, int]:
        """Every label outside the federation's classes, as written in the CSV, with its number of rows."""
        return dict(sorted(self.unknown.items(), key=lambda kv: (-kv[1], kv[0])))

    def counts(self) -> dict[str, int]:
        """Number of issues per kind (all kinds present, zeros included): safe to share."""
        out = {kind: 0 for kind in ISSUE_KINDS}
        for issue in self.issues:
            out[issue.kind] += 1
        return out


def _find_column(header: Sequence[str], names: Iterable[str]) -> int | None:
    normalised = [_normalise(h) for h in header]
    for name in names:
        if name in normalised:
            return normalised.index(name)
    return None


def read_labels(path: str | os.PathLike[str], class_names: Sequence[str]) -> LabelTable:
    """Read a labels CSV, keeping every valid label and reporting every problem.

    Args:
        path: the CSV file (UTF-8, comma, semicolon or tab separated, with a header row).
        class_names: the allowed classes, e.g. ``("normal", "ggo", "fibrosis", "emphysema")``.

    Returns:
        A :class:`LabelTable`. Rows with an unknown class or an empty id are reported and not used;
        repeated rows with the same class are reported once and used once; an id given two different classes
        is reported as a conflict and left unlabelled.

    Raises:
        SiteConfigError: if the file is missing or unreadable, or has no id or no class column.
    """
    path = Path(path)
    text = read_text(path, SiteConfigError, what="the labels CSV", encoding="utf-8-sig",
                     fix="fix data.labels in site.yaml or pass --labels")
    lines = [line for line in text.splitlines()]
    if not lines or not lines[0].strip():
        raise SiteConfigError(f"Unable to read the labels CSV {path} as it is empty; expected a header such as "
                              "'patient_id,label'")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(lines, dialect))
    header = rows[0]
    id_col, id_kind = None, None
    for kind, names in ID_COLUMNS.items():
        id_col = _find_column(header, names)
        if id_col is not None:
            id_kind = kind
            break
    label_col = _find_column(header, LABEL_COLUMNS)
    if id_col is None or id_kind is None:
        allowed = ", ".join(names[0] for names in ID_COLUMNS.values())
        raise SiteConfigError(f"Unable to read the labels CSV {path} as its header {header} has no id column; "
                              f"expected one of {allowed}")
    if label_col is None:
        raise SiteConfigError(f"Unable to read the labels CSV {path} as its header {header} has no class column; "
                              f"expected one of {', '.join(LABEL_COLUMNS)}")
    allowed_classes = {c.lower(): c for c in class_names}
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    conflicts: set[str] = set()
    issues: list[LabelIssue] = []
    unknown: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        key = row[id_col].strip() if id_col < len(row) else ""
        given = row[label_col].strip() if label_col < len(row) else ""
        if not key:
            issues.append(LabelIssue(number, "empty-id", f"line {number}: the {id_kind} id is empty; row ignored"))
            continue
        cls = allowed_classes.get(given.lower())
        if cls is None:
            unknown[given] = unknown.get(given, 0) + 1
            issues.append(LabelIssue(number, "unknown-class",
                                     f"line {number}: class {given!r} is not one of {', '.join(class_names)}; "
                                     "row ignored"))
            continue
        if key in first_line:
            if key in conflicts:
                continue
            previous = labels[key]
            if previous == cls:
                issues.append(LabelIssue(number, "duplicate", f"line {number}: repeats line {first_line[key]} "
                                                               f"({cls}); used once"))
            else:
                conflicts.add(key)
                issues.append(LabelIssue(number, "conflict",
                                         f"line {number}: gives {cls!r} but line {first_line[key]} gave "
                                         f"{previous!r} for the same {id_kind}; left unlabelled until fixed"))
            continue
        labels[key] = cls
        first_line[key] = number
    for key in conflicts:
        del labels[key]
    return LabelTable(source=str(path), id_kind=id_kind, labels=labels, lines=first_line, issues=issues,
                      unknown=unknown)
