"""Hash-chained JSON-lines logs: each record carries the SHA-256 of the line before it.

Both the coordinator's audit log and each site's own log are chained, so that removing, reordering or
editing any line breaks the chain at the next line, and a separate head file (``<log>.head``: the number
of records and the hash of the last line, rewritten atomically after every append) catches a removed last
line. One process at a time appends (``flock`` on the log), so a ServerApp and the `lungmae server run`
process that share a log cannot fork the chain.

A record is ``{"ts": ..., "event": ..., **fields, "prev": "<hex sha256 of the previous line>"}``; the first
record's ``prev`` is 64 zeros. The hash of a line is taken over its UTF-8 bytes without the newline.

Examples:
    >>> append_record(Path("audit.jsonl"), {"ts": "...", "event": "run-started"})
    >>> verify_chain(Path("audit.jsonl")).ok
    True
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lungmae_core.atomic import atomic_write_json, read_json_object
from lungmae_core.errors import LungMAEError

__all__ = ["GENESIS", "ChainError", "ChainReport", "append_record", "head_path", "line_hash", "verify_chain"]

GENESIS = "0" * 64
_TAIL_BYTES = 1 << 16


class ChainError(LungMAEError, ValueError):
    """A chained log could not be appended to (its last line is not a chained record)."""


def line_hash(line: str | bytes) -> str:
    """Hex SHA-256 of one log line (without its newline)."""
    data = line.encode() if isinstance(line, str) else line
    return hashlib.sha256(data.rstrip(b"\n")).hexdigest()


def head_path(log: Path) -> Path:
    """The head file that records the length and last hash of ``log``."""
    return log.with_name(log.name + ".head")


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - _TAIL_BYTES)
    while True:
        data = os.pread(fd, size - start, start)
        lines = data.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or start == 0:
            return lines[-1]
        start = max(0, start - _TAIL_BYTES)


def append_record(log: Path, entry: Mapping[str, Any], *,
                  finalize: Callable[[dict[str, Any], str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Append ``entry`` (plus ``prev``) to ``log`` under an exclusive lock, fsync it, then update the head.

    Args:
        log: the JSON-lines file (created 0640 if missing).
        entry: the record without ``prev``.
        finalize: called with ``(record with prev, its canonical text)`` before writing; may add fields
            (the audit log adds a signature on checkpoint lines).

    Returns:
        The record as written.

    Raises:
        ChainError: if the last line of ``log`` is not JSON (a torn write is never chained onto).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        if last is None:
            prev, count = GENESIS, 0
        else:
            try:
                json.loads(last)
            except ValueError as exc:
                raise ChainError(f"Unable to append to {log} as its last line is not a complete JSON record "
                                 f"(a torn write?); run `lungmae audit verify` on it and move it away") from exc
            prev = line_hash(last)
            head = _read_head(log)
            count = int(head["records"]) if head and head.get("last") == prev else _count_lines(fd)
        record = dict(entry)
        record["prev"] = prev
        if finalize is not None:
            record = finalize(record, canonical(record))
        line = canonical(record)
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
        atomic_write_json(head_path(log), {"records": count + 1, "last": line_hash(line)}, 0o640)
        return record
    finally:
        os.close(fd)


def canonical(record: Mapping[str, Any]) -> str:
    """The one text form of a record (insertion order kept, no spaces, no NaN)."""
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


def _count_lines(fd: int) -> int:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0).rstrip(b"\n").count(b"\n") + 1 if size else 0


def _read_head(log: Path) -> dict[str, Any] | None:
    return read_json_object(head_path(log))


@dataclasses.dataclass
class ChainReport:
    """Outcome of :func:`verify_chain`: ``ok``, records read, and the first broken link (1-based line)."""

    path: Path
    records: int = 0
    broken_line: int | None = None
    problem: str = ""
    checked: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.broken_line is None and not self.problem

    def render(self) -> str:
        if self.ok:
            extra = "".join(f", {n} {what}" for what, n in sorted(self.checked.items()))
            return f"OK   {self.path}: {self.records} records, chain intact{extra}"
        where = f" at line {self.broken_line}" if self.broken_line is not None else ""
        return f"FAIL {self.path}: broken{where}: {self.problem}"


def verify_chain(log: Path, *, check_record: Callable[[int, dict[str, Any], str], str | None] | None = None,
                 require_head: bool = True) -> ChainReport:
    """Walk ``log`` and report the first line whose ``prev`` is not the hash of the line before it.

    Args:
        log: the chained JSON-lines file.
        check_record: optional extra check per record, ``(line number, record, its text) -> problem or None``
            (the audit log checks checkpoint signatures here).
        require_head: also compare with the head file (catches a removed last line).
    """
    report = ChainReport(path=log)
    try:
        lines = log.read_bytes().split(b"\n")
    except OSError as exc:
        report.problem = f"unable to read it ({exc.strerror or exc})"
        return report
    if lines and lines[-1] == b"":
        lines.pop()
    prev = GENESIS
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            report.broken_line, report.problem = number, "the line is not a JSON record (edited or torn)"
            return report
        if record.get("prev") != prev:
            report.broken_line = number
            report.problem = ("its 'prev' hash does not match line " + str(number - 1) +
                              " (that line was edited, or lines were removed or reordered before this one)"
                              if number > 1 else "the first record does not start the chain (lines were removed "
                                                 "from the start)")
            return report
        if check_record is not None:
            problem = check_record(number, record, raw.decode("utf-8", "replace"))
            if problem:
                report.broken_line, report.problem = number, problem
                return report
        prev = line_hash(raw)
        report.records = number
    if require_head:
        head = _read_head(log)
        if head is None:
            if lines:
                report.problem = f"its head file {head_path(log).name} is missing or unreadable"
        elif int(head.get("records", -1)) != len(lines) or head.get("last") != (prev if lines else None):
            report.broken_line = len(lines) + 1 if int(head.get("records", 0)) > len(lines) else len(lines)
            report.problem = (f"the head file records {head.get('records')} records ending in "
                              f"{str(head.get('last'))[:12]}..., the log has {len(lines)} ending in {prev[:12]}... "
                              "(the last line(s) were removed or edited)")
    return report
