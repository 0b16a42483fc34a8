"""Append-only audit log of the coordinator: one JSON line per event, flushed and fsync'd at once.

A consortium must be able to show, weeks later, what the server did: when a run started or resumed, which
sites joined or left, which updates were accepted or rejected and why, which checkpoints were written and
which configuration (by hash) was in force. The log never holds patient data: field names that point at
patient-level information are refused, and values must be plain JSON scalars or small lists/mappings of them.

Examples:
    >>> log = AuditLog(run_dir / "audit.jsonl")
    >>> log.record("run-started", run_id=42, config_hash=config_hash(run_config))
    >>> log.record("update-rejected", site="hospital-a", server_round=3, reason="norm 812.4 > max-norm 100")
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lungmae_core.errors import LungMAEError

__all__ = ["AuditLog", "AuditLogError", "EVENTS", "config_hash", "iter_events", "read_audit_log"]

logger = logging.getLogger(__name__)

# The events the coordinator records. Others are allowed (the name is checked for shape only), but these
# are the ones the runbook, `lungmae server status` and the alert rules know about.
EVENTS = frozenset({
    "run-started",         # config_hash, run_id, phases
    "run-resumed",         # config_hash, run_id, phase, server_round (the last complete round restored)
    "run-finished",        # status ("completed" / "failed"), rounds
    "site-joined",         # site (node id or site name)
    "site-left",           # site, reason
    "round-started",       # phase, server_round, sampled
    "round-finished",      # phase, server_round, replied, failed, rejected, duration_s
    "update-accepted",     # site, phase, server_round, num_examples
    "update-rejected",     # site, phase, server_round, reason
    "checkpoint-written",  # phase, server_round, file (a server-side path), sha256
    "config-hash",         # config_hash, source
})

# Words that must never appear in a field name: they would point at patient-level information.
_FORBIDDEN_KEY_PARTS = ("patient", "study", "series_uid", "series-uid", "sop", "dicom", "nifti", "accession",
                        "birth", "mrn")
_EVENT_RE = re.compile(r"^[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*$")
_MAX_STRING = 512


class AuditLogError(LungMAEError, ValueError):
    """An audit record was refused (bad event name, a field that could carry patient data, a non-JSON value)."""


def config_hash(config: Mapping[str, Any] | str | bytes) -> str:
    """SHA-256 of a configuration, stable across key order, so the audit log can prove which config ran.

    Args:
        config: a mapping (hashed as canonical JSON with sorted keys), or the raw text/bytes of a file.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    if isinstance(config, Mapping):
        data = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    elif isinstance(config, str):
        data = config.encode()
    else:
        data = bytes(config)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_value(key: str, value: Any, depth: int = 0) -> Any:
    """Return ``value`` as plain JSON or raise naming the field; keeps records small and non-identifying."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf; keep them readable
    if isinstance(value, str):
        if len(value) > _MAX_STRING:
            raise AuditLogError(
                f"Unable to record audit field '{key}' as its text is {len(value)} characters long "
                f"(at most {_MAX_STRING}); record a summary or a hash instead")
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if depth < 2 and isinstance(value, list | tuple):
        return [_check_value(key, v, depth + 1) for v in value]
    if depth < 2 and isinstance(value, Mapping):
        return {str(k): _check_value(f"{key}.{k}", v, depth + 1) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "size", 2) == 1:
        return _check_value(key, value.item(), depth)  # numpy / torch scalars
    raise AuditLogError(
        f"Unable to record audit field '{key}' as {type(value).__name__} is not a JSON scalar, list or "
        "mapping; convert it to a number or a short string first")


class AuditLog:
    """Append-only JSON-lines audit log; ``AuditLog(None)`` records nothing (audit disabled).

    Every :meth:`record` call appends one line ``{"ts": ISO-8601 UTC, "event": ..., **fields}`` and
    fsyncs the file before returning, so a record survives a crash or a SIGKILL of the server the moment
    it is written. The file is opened in append mode for each record, so several processes (a restarted
    ServerApp, ``lungmae server run``) can share it without truncating each other's lines.

    Args:
        path: the ``audit.jsonl`` file (parent directories are created); ``None`` disables auditing.

    Raises:
        AuditLogError: from :meth:`record`, for an invalid event name or a field that could carry patient
            data or is not JSON.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        """Whether records are written to disk."""
        return self.path is not None

    def record(self, event: str, /, **fields: Any) -> dict[str, Any]:
        """Append one event and fsync it.

        Args:
            event: kebab-case event name, normally one of :data:`EVENTS` (e.g. ``"update-rejected"``).
            fields: plain JSON values (numbers, short strings, lists/mappings of them). Names mentioning
                patients, studies, series UIDs, accession numbers or DICOM are refused.

        Returns:
            The record as written (also when auditing is disabled, for logging by the caller).

        Raises:
            AuditLogError: naming the event or the field that was refused.
        """
        if not isinstance(event, str) or not _EVENT_RE.match(event):
            raise AuditLogError(
                f"Unable to record audit event {event!r} as event names must be lower-case words joined by "
                f"'-', e.g. one of {', '.join(sorted(EVENTS))}")
        entry: dict[str, Any] = {
            "ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
        }
        for key, value in fields.items():
            lowered = key.lower()
            bad = next((part for part in _FORBIDDEN_KEY_PARTS if part in lowered), None)
            if bad is not None:
                raise AuditLogError(
                    f"Unable to record audit field '{key}' of event '{event}' as field names containing "
                    f"'{bad}' could carry patient data; the server audit log holds aggregates only")
            if key in ("ts", "event"):
                raise AuditLogError(f"Unable to record audit field '{key}' as it is reserved for the log itself")
            entry[key] = _check_value(key, value)
        if self.path is None:
            return entry
        line = json.dumps(entry, sort_keys=False, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        logger.debug("audit %s", line.rstrip())
        return entry


def read_audit_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every record of an audit log; a torn last line (crash mid-write) is skipped with a warning.

    Raises:
        AuditLogError: if a line other than the last is not valid JSON (the file was edited or corrupted).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("Skipping the torn last line %d of %s", number, path)
                continue
            raise AuditLogError(f"Unable to read {path} as line {number} is not valid JSON: {exc.msg}") from exc
    return records


def iter_events(records: list[dict[str, Any]], event: str) -> Iterator[dict[str, Any]]:
    """The records of one event type, in order."""
    return (r for r in records if r.get("event") == event)
