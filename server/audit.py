"""Append-only, hash-chained audit log of the coordinator: one JSON line per event, fsync'd at once.

A consortium must be able to show, weeks later, what the server did: when a run started or resumed, which
sites joined or left, which updates were accepted or rejected and why, which checkpoints were written and
which configuration (by hash) was in force. The log never holds patient data: field names that point at
patient-level information are refused, and values must be plain JSON scalars or small lists/mappings of them.

It is evidence, not just a log: each line carries the SHA-256 of the line before it (``prev``,
``lungmae_core/hashchain.py``), a head file records the number of lines and the last hash, each
``checkpoint-written`` line carries the checkpoint file's SHA-256, and, when the server has an audit signing
key (``LUNGMAE_AUDIT_SIGNING_KEY`` or ``signing_key=``; `lungmae certs` makes ``server/audit-signing.key``),
the server's Ed25519 signature over that line. ``lungmae audit verify RUN_DIR`` reports the first broken link.

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
from lungmae_core.hashchain import ChainReport, append_record, canonical, verify_chain
from lungmae_core.signing import AUDIT_DOMAIN, load_private_key, load_public_key, sign, verify

__all__ = ["AUDIT_KEY_ENV", "AuditLog", "AuditLogError", "EVENTS", "config_hash", "iter_events", "read_audit_log",
           "verify_audit_log"]

#: Environment variable naming the server's Ed25519 audit signing key (set by `lungmae server start`).
AUDIT_KEY_ENV = "LUNGMAE_AUDIT_SIGNING_KEY"

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
    "checkpoint-written",  # phase, server_round, file (a server-side path), sha256, sig (server signature)
    "config-hash",         # config_hash, source
})

# Words that must never appear in a field name: they would point at patient-level information.
_FORBIDDEN_KEY_PARTS = ("patient", "study", "series_uid", "series-uid", "sop", "dicom", "nifti", "accession",
                        "birth", "mrn")
_EVENT_RE = re.compile(r"^[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*$")
_MAX_STRING = 512
_CHAIN_FIELDS = ("prev", "sig")


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

    Every :meth:`record` call appends one line ``{"ts": ISO-8601 UTC, "event": ..., **fields, "prev": ...}``
    and fsyncs the file before returning, so a record survives a crash or a SIGKILL of the server the moment
    it is written. Appends take an exclusive lock on the file, so several processes (a restarted ServerApp,
    ``lungmae server run``) can share it without forking the chain.

    Args:
        path: the ``audit.jsonl`` file (parent directories are created); ``None`` disables auditing.
        signing_key: the server's Ed25519 key that signs checkpoint lines. Defaults to the file named by
            ``$LUNGMAE_AUDIT_SIGNING_KEY``; none: checkpoint lines carry their SHA-256 but no signature.

    Raises:
        AuditLogError: from :meth:`record`, for an invalid event name or a field that could carry patient
            data or is not JSON.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *,
                 signing_key: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        key = signing_key if signing_key is not None else os.environ.get(AUDIT_KEY_ENV) or None
        self._key = load_private_key(Path(key)) if key is not None and self.path is not None else None
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
            "ts": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        for key, value in fields.items():
            lowered = key.lower()
            bad = next((part for part in _FORBIDDEN_KEY_PARTS if part in lowered), None)
            if bad is not None:
                raise AuditLogError(
                    f"Unable to record audit field '{key}' of event '{event}' as field names containing "
                    f"'{bad}' could carry patient data; the server audit log holds aggregates only")
            if key in ("ts", "event", *_CHAIN_FIELDS):
                raise AuditLogError(f"Unable to record audit field '{key}' as it is reserved for the log itself")
            entry[key] = _check_value(key, value)
        if self.path is None:
            return entry
        if event == "checkpoint-written" and "sha256" not in entry and isinstance(entry.get("file"), str):
            digest = self._checkpoint_sha256(entry["file"])
            if digest is not None:
                entry["sha256"] = digest
        finalize = self._sign if event == "checkpoint-written" and self._key is not None else None
        with self._lock:
            entry = append_record(self.path, entry, finalize=finalize)
        logger.debug("audit %s", canonical(entry))
        return entry

    def _checkpoint_sha256(self, name: str) -> str | None:
        assert self.path is not None
        return _checkpoint_sha256(self.path.parent, name)

    def _sign(self, record: dict[str, Any], text: str) -> dict[str, Any]:
        assert self._key is not None
        return {**record, "sig": sign(text.encode(), self._key, AUDIT_DOMAIN)}


def _checkpoint_sha256(run_dir: Path, name: str) -> str | None:
    """``"sha256:<hex>"`` of a checkpoint named relative to the run directory (or its ``checkpoints/``)."""
    for candidate in (Path(name), run_dir / name, run_dir / "checkpoints" / name):
        if candidate.is_file():
            digest = hashlib.sha256()
            with open(candidate, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            return "sha256:" + digest.hexdigest()
    logger.warning("Unable to hash checkpoint %s for the audit log as it is not under %s", name, run_dir)
    return None


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


def verify_audit_log(path: str | os.PathLike[str], public_key: str | os.PathLike[str] | None = None, *,
                     check_files: bool = True) -> ChainReport:
    """Check the chain of an audit log, the signature of every signed line and, where the file is still
    there, that each checkpoint's SHA-256 matches the file the line names.

    Args:
        path: the ``audit.jsonl`` file.
        public_key: the server's audit public key (``server/audit-signing.pub``); None: signatures are not
            checked, but a signed line must still be chained.
        check_files: compare recorded checkpoint hashes with the files (a later checkpoint of the same
            step legitimately replaces a file, so only the newest line per file is compared).

    Returns:
        A :class:`lungmae_core.hashchain.ChainReport`.
    """
    path = Path(path)
    key = load_public_key(Path(public_key)) if public_key is not None else None
    newest: dict[str, tuple[int, str]] = {}
    counts = {"signatures checked": 0}

    def _check(number: int, record: dict[str, Any], _text: str) -> str | None:
        if record.get("event") == "checkpoint-written" and isinstance(record.get("sha256"), str):
            newest[str(record.get("file"))] = (number, record["sha256"])
        if "sig" in record and key is not None:
            unsigned = {k: v for k, v in record.items() if k != "sig"}
            if not verify(canonical(unsigned).encode(), str(record["sig"]), key, AUDIT_DOMAIN):
                return "the server's signature on this line does not verify (the line was edited)"
            counts["signatures checked"] += 1
        elif key is not None and record.get("event") == "checkpoint-written":
            return "this checkpoint line carries no server signature"
        return None

    report = verify_chain(path, check_record=_check)
    if report.ok and check_files:
        for name, (number, digest) in newest.items():
            actual = _checkpoint_sha256(path.parent, name)
            if actual is not None and actual != digest:
                report.broken_line = number
                report.problem = f"checkpoint {name} no longer has the SHA-256 recorded here ({digest[:19]}...)"
                break
    report.checked = counts if key is not None else {}
    return report


def iter_events(records: list[dict[str, Any]], event: str) -> Iterator[dict[str, Any]]:
    """The records of one event type, in order."""
    return (r for r in records if r.get("event") == event)
