"""The site's own hash-chained log of what the coordinator asked and what this site released or refused.

A hospital must not have to take the coordinator's word for what happened: this log is written at the site,
by the site, with the same chain as the server's audit log (``lungmae_core/hashchain.py``), and checked with
``lungmae audit verify <log>``. It records requests (message type, phase, round), releases (what was sent
back: counts and metric names, never per-scan values), refusals (a policy rule, an untrusted app bundle)
and nothing that identifies a patient.

The ClientApp records each exchange with one call, ``return record_exchange(site, msg, reply)`` (the request,
and what the reply releases: metric names, example count, number and size of arrays, or the refusal); the
FAB check records every bundle it accepts or refuses, before any of the bundle's code is imported.

Examples:
    >>> record_site_event(site_cfg, "released", message_type="train.pretrain", server_round=3,
    ...                   num_examples=12, metrics=["train_loss"])
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

from lungmae_core.hashchain import ChainReport, append_record, verify_chain

__all__ = ["SITE_AUDIT_NAME", "record_exchange", "record_site_event", "site_audit_path", "verify_site_audit"]

logger = logging.getLogger(__name__)

SITE_AUDIT_NAME = "site-audit.jsonl"
_FORBIDDEN = ("patient", "study", "series", "sop", "accession", "birth", "mrn", "path", "uid")
_MAX_TEXT = 300


def site_audit_path(cfg: Any) -> Path:
    """Where a site keeps its log: ``trust: audit-log`` in site.yaml, else ``<site: state-dir>/site-audit.jsonl``.

    Evidence lives with the ledger in the state directory, not in the cache, so rebuilding the cache cannot
    erase it.
    """
    explicit = getattr(getattr(cfg, "trust", None), "audit_log", None)
    if explicit:
        return Path(explicit)
    state_dir = getattr(getattr(cfg, "site", None), "state_dir", None)
    if state_dir is not None:
        return Path(state_dir) / SITE_AUDIT_NAME
    if getattr(cfg.data, "cache", None) is not None:
        return Path(cfg.data.cache) / SITE_AUDIT_NAME
    return Path(cfg.source).resolve().parent / SITE_AUDIT_NAME


def _plain(key: str, value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if depth < 2 and isinstance(value, list | tuple):
        return [_plain(key, v, depth + 1) for v in value]
    if depth < 2 and isinstance(value, dict):
        return {str(k): _plain(f"{key}.{k}", v, depth + 1) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        return _plain(key, value.item(), depth)
    return str(value)[:_MAX_TEXT]


def record_site_event(cfg_or_path: Any, event: str, /, **fields: Any) -> dict[str, Any] | None:
    """Append one chained record to the site's log; never raises into the caller's round.

    Args:
        cfg_or_path: the loaded ``SiteConfig`` or the log path itself.
        event: ``"asked"``, ``"released"``, ``"refused"``, ``"fab-accepted"``, ``"fab-refused"``, ...
        fields: short plain values. Field names that could carry patient data or a file path are dropped
            (with a warning), so a careless caller cannot leak through the site's own log.

    Returns:
        The record written, or None if it could not be written (logged as an error).
    """
    path = Path(cfg_or_path) if isinstance(cfg_or_path, str | os.PathLike) else site_audit_path(cfg_or_path)
    entry: dict[str, Any] = {"ts": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
                             "event": str(event)[:64]}
    for key, value in fields.items():
        if any(part in key.lower() for part in _FORBIDDEN) or key in ("ts", "event", "prev"):
            logger.warning("Leaving field %r out of the site audit log (it could identify a patient or a file)", key)
            continue
        entry[key] = _plain(key, value)
    try:
        return append_record(path, entry)
    except (OSError, ValueError) as exc:
        logger.error("Unable to write the site audit log %s: %s", path, exc)
        return None


def record_exchange(cfg: Any, msg: Any, reply: Any) -> Any:
    """Record what the coordinator asked (``msg``) and what this site answers (``reply``); returns ``reply``.

    ``released`` lists only what leaves: metric names, ``num_examples``, the number of arrays and their bytes;
    an error reply is recorded as ``refused`` with its reason (already written to be sent).
    """
    try:
        config = msg.content["config"] if "config" in msg.content else {}
        asked = {"message_type": msg.metadata.message_type, "phase": config.get("phase"),
                 "server_round": config.get("server-round")}
        if reply.has_error():
            record_site_event(cfg, "refused", **asked, code=reply.error.code, reason=reply.error.reason)
            return reply
        metrics = {k: v for record in reply.content.metric_records.values() for k, v in record.items()}
        arrays = [a for record in reply.content.array_records.values() for a in record.values()]
        record_site_event(cfg, "released", **asked, metrics=sorted(metrics),
                          num_examples=metrics.get("num_examples"), arrays=len(arrays),
                          array_bytes=sum(len(a.data) for a in arrays))
    except Exception as exc:  # the log must never break a round
        logger.error("Unable to record the exchange in the site audit log: %s", exc)
    return reply


def verify_site_audit(path: Path) -> ChainReport:
    """Check a site's log: the chain and its head file (see ``lungmae audit verify``)."""
    return verify_chain(Path(path))
