"""Where the coordinator reports what happened: Prometheus metrics and the hash-chained audit log.

One object so the runner says each thing once: a dropped reply (site, check, reason: never a value from
the reply, never patient data) is counted in Prometheus (``lungmae_updates_rejected{reason=check}``) and
recorded in ``audit.jsonl`` (``update-rejected``) by the same call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.audit import AuditLog
from server.prometheus import FederationMetrics

__all__ = ["Telemetry"]

log = logging.getLogger(__name__)


class Telemetry:
    """Prometheus + audit log of one run.

    Args:
        audit_path: ``audit.jsonl`` (None: no audit log).
        metrics_port: Prometheus port (0: any free port; None: in memory only).
    """

    def __init__(self, audit_path: Path | None, metrics_port: int | None) -> None:
        self.audit = AuditLog(audit_path)
        self.prom = FederationMetrics(metrics_port)

    def event(self, event: str, **fields: Any) -> None:
        """An audit event (site-joined, run-started, checkpoint-written, ...)."""
        self.audit.record(event, **fields)

    def round_finished(self, record: dict[str, Any], duration_s: float) -> None:
        """Prometheus figures, accepted and dropped replies, and the round line of the audit log."""
        phase, server_round = record["phase"], record["round"]
        rejected = record["rejected_updates"]
        by_check: dict[str, int] = {}
        for r in rejected:
            by_check[r["check"]] = by_check.get(r["check"], 0) + 1
        participation = record["participation"]
        scalars = {k: v for k, v in record["evaluate"]["aggregated"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.prom.round_finished(
            phase, server_round, duration_s=duration_s, sampled=len(participation["sampled"]),
            replied=len(participation["replied"]) + len(rejected), failed=len(record["failures"]),
            rejected=by_check, bytes_sent=record["bytes"]["down"], bytes_received=record["bytes"]["up"],
            train_metrics={k: v for k, v in record["train"]["aggregated"].items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)},
            eval_metrics=scalars)
        for site, metrics in record["train"]["sites"].items():
            self.audit.record("update-accepted", site=site, phase=phase, server_round=server_round,
                              num_examples=int(metrics.get("num_examples", 0)))
        for r in rejected:
            self.audit.record("update-rejected", site=r["site"], phase=phase, server_round=server_round,
                              check=r["check"], reason=str(r["reason"])[:300])
        self.audit.record("round-finished", phase=phase, server_round=server_round,
                          replied=len(participation["replied"]), failed=len(record["failures"]),
                          rejected=len(rejected), duration_s=round(duration_s, 3))

    def final_drops(self, rejected: list[dict[str, Any]]) -> None:
        """Drops of the final evaluation (no training round to attach them to)."""
        by_check: dict[str, int] = {}
        for r in rejected:
            by_check[r["check"]] = by_check.get(r["check"], 0) + 1
            self.audit.record("update-rejected", site=r["site"], phase="final", server_round=0,
                              check=r["check"], reason=str(r["reason"])[:300])
        if by_check:
            self.prom.round_finished("final", 0, duration_s=0.0, sampled=0, replied=0, failed=0, rejected=by_check)

    def site_epsilon(self, site: str, epsilon: float, budget: float | None) -> None:
        self.prom.site_epsilon(site, epsilon, budget)

    def close(self) -> None:
        self.prom.close()
