"""Tests for server/audit.py: append-only, fsync'd JSON lines without patient data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.audit import AuditLog, AuditLogError, config_hash, iter_events, read_audit_log


def test_records_are_appended_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "run" / "audit.jsonl"
    log = AuditLog(path)
    log.record("run-started", run_id=7, config_hash=config_hash({"a": 1}))
    log.record("update-rejected", site="hospital-a", server_round=2, reason="norm 812.4 > max-norm 100")
    AuditLog(path).record("run-resumed", server_round=2)  # a second writer (restarted server) appends
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["run-started", "update-rejected", "run-resumed"]
    first = json.loads(lines[0])
    assert first["run_id"] == 7 and first["ts"].endswith("+00:00")
    assert list(first)[:2] == ["ts", "event"]
    records = read_audit_log(path)
    assert [r["reason"] for r in iter_events(records, "update-rejected")] == ["norm 812.4 > max-norm 100"]


def test_record_survives_sigkill_of_writer(tmp_path: Path) -> None:
    """Each record is on disk when record() returns: a process killed right after leaves it intact."""
    path = tmp_path / "audit.jsonl"
    code = (f"import os, signal; from server.audit import AuditLog; "
            f"AuditLog({str(path)!r}).record('checkpoint-written', server_round=3); "
            f"os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], timeout=60)
    assert proc.returncode == -9
    assert read_audit_log(path)[0]["server_round"] == 3


@pytest.mark.parametrize(
    ("event", "fields", "message"),
    [
        ("Run Started", {}, "event names must be lower-case words"),
        ("site-joined", {"patient_id": "P001"}, "field names containing 'patient'"),
        ("site-joined", {"StudyInstanceUID": "1.2.3"}, "containing 'study'"),
        ("site-joined", {"dicom_dir": "/data"}, "containing 'dicom'"),
        ("site-joined", {"ts": "x"}, "reserved"),
        ("site-joined", {"event": "x"}, "reserved"),
        ("site-joined", {"blob": object()}, "object is not a JSON scalar"),
        ("site-joined", {"reason": "x" * 600}, "600 characters long"),
    ],
)
def test_bad_records_are_refused(tmp_path: Path, event: str, fields: dict, message: str) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditLogError, match=message):
        log.record(event, **fields)
    assert not (tmp_path / "audit.jsonl").exists() or (tmp_path / "audit.jsonl").read_text() == ""


def test_values_are_made_plain_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    entry = log.record("round-finished", loss=np.float32(0.5), replied=np.int64(2), nan=float("nan"),
                       file=tmp_path / "ckpt.pt", counts={"norm": 1}, sites=("a", "b"))
    assert entry["loss"] == 0.5 and entry["replied"] == 2 and entry["nan"] == "nan"
    assert entry["file"] == str(tmp_path / "ckpt.pt") and entry["sites"] == ["a", "b"]
    assert read_audit_log(tmp_path / "a.jsonl")[0]["counts"] == {"norm": 1}


def test_disabled_log_writes_nothing_but_still_validates(tmp_path: Path) -> None:
    log = AuditLog(None)
    assert not log.enabled
    assert log.record("run-finished", status="completed")["status"] == "completed"
    with pytest.raises(AuditLogError):
        log.record("run-finished", patient="x")
    assert os.listdir(tmp_path) == []


def test_torn_last_line_is_skipped_and_corrupt_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record("run-started")
    with path.open("a") as fh:
        fh.write('{"ts": "2026-')
    assert [r["event"] for r in read_audit_log(path)] == ["run-started"]
    with path.open("a") as fh:
        fh.write("\n" + json.dumps({"event": "run-finished"}) + "\n")
    with pytest.raises(AuditLogError, match="line 2 is not valid JSON"):
        read_audit_log(path)


def test_config_hash_is_stable_across_key_order() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert config_hash("x: 1\n").startswith("sha256:") and len(config_hash(b"x")) == 7 + 64
