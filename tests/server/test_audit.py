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


# ------------------------------------------------------------------------------------------ chain and signatures
def _chained_log(tmp_path: Path, key: Path | None = None) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-0000.pt").write_bytes(b"weights")
    log = AuditLog(run / "audit.jsonl", signing_key=key)
    log.record("run-started", config_hash=config_hash({"a": 1}))
    log.record("round-started", phase="pretrain", server_round=1, sampled=2)
    log.record("checkpoint-written", phase="pretrain", server_round=1, file="step-0000.pt")
    log.record("round-finished", phase="pretrain", server_round=1, replied=2)
    log.record("run-finished", status="completed")
    return run


def _verify(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "lungmae_cli.main", "audit", "verify", *args],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_each_record_carries_the_hash_of_the_previous_line_and_checkpoints_their_sha256(tmp_path: Path) -> None:
    import hashlib
    import itertools

    run = _chained_log(tmp_path)
    lines = (run / "audit.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["prev"] == "0" * 64
    for before, line in itertools.pairwise(lines):
        assert json.loads(line)["prev"] == hashlib.sha256(before.encode()).hexdigest()
    ckpt = json.loads(lines[2])
    assert ckpt["sha256"] == "sha256:" + hashlib.sha256(b"weights").hexdigest() and "sig" not in ckpt
    assert json.loads((run / "audit.jsonl.head").read_text())["records"] == 5
    assert _verify(str(run)) == (0, f"OK   {run / 'audit.jsonl'}: 5 records, chain intact\n")


@pytest.mark.parametrize("line", range(5))
def test_deleting_any_line_is_detected(tmp_path: Path, line: int) -> None:
    run = _chained_log(tmp_path)
    path = run / "audit.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    del lines[line]
    path.write_text("".join(lines))
    code, out = _verify(str(run))
    assert code == 1 and "FAIL" in out
    if line < 4:
        assert f"broken at line {line + 1}:" in out, out
    else:
        assert "the last line(s) were removed or edited" in out, out


@pytest.mark.parametrize("line", range(5))
def test_editing_any_line_is_detected(tmp_path: Path, line: int) -> None:
    run = _chained_log(tmp_path)
    path = run / "audit.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[line])
    record["edited"] = True
    lines[line] = json.dumps(record, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    code, out = _verify(str(run))
    assert code == 1, out
    assert f"broken at line {line + 2}:" in out or (line == 4 and "were removed or edited" in out), out


def test_checkpoint_lines_are_signed_and_a_forged_line_fails(tmp_path: Path) -> None:
    from lungmae_core.hashchain import canonical, line_hash
    from lungmae_core.signing import make_signing_key

    key, pub = make_signing_key(tmp_path / "keys", "audit-signing")
    run = _chained_log(tmp_path, key)
    code, out = _verify(str(run), "--public-key", str(pub))
    assert code == 0 and "1 signatures checked" in out, out
    # rewrite the checkpoint line with another hash and re-chain everything after it: only the key can sign
    path = run / "audit.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[2]["sha256"] = "sha256:" + "0" * 64
    lines = []
    for i, rec in enumerate(records):
        if i:
            rec["prev"] = line_hash(lines[-1])
        lines.append(canonical(rec))
    path.write_text("\n".join(lines) + "\n")
    (run / "audit.jsonl.head").write_text(json.dumps({"records": 5, "last": line_hash(lines[-1])}))
    code, out = _verify(str(run), "--public-key", str(pub))
    assert code == 1 and "broken at line 3: the server's signature on this line does not verify" in out, out


def test_a_replaced_checkpoint_file_is_detected(tmp_path: Path) -> None:
    run = _chained_log(tmp_path)
    (run / "checkpoints" / "step-0000.pt").write_bytes(b"other weights")
    code, out = _verify(str(run))
    assert code == 1 and "checkpoint step-0000.pt no longer has the SHA-256 recorded here" in out, out
    assert _verify(str(run), "--no-files")[0] == 0


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    code = (f"from server.audit import AuditLog; log = AuditLog({str(path)!r}); "
            f"[log.record('site-joined', site=f'n{{i}}') for i in range(40)]")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    from server.audit import verify_audit_log

    report = verify_audit_log(path)
    assert report.ok and report.records == 120, report.render()


def test_reserved_chain_fields_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError, match="reserved"):
        AuditLog(tmp_path / "a.jsonl").record("site-joined", prev="0" * 64)
