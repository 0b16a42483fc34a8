"""Prometheus metrics of the coordinator: phase, rounds, sites, bytes, aggregated losses, epsilon, checkpoint age.

The ServerApp owns one :class:`FederationMetrics` and calls it at each step of the schedule; Prometheus
scrapes it over HTTP (loopback by default: expose it through a reverse proxy or bind the host explicitly).
Each instance has its own registry, so tests and a restarted ServerApp never collide on metric names.
Only aggregates and site names go out: no per-scan value, patient identifier or site path.

Metric names (all prefixed ``lungmae_``; see ``deploy/prometheus/alerts.yml`` for the alert rules):

=================================================  =====================================================
``phase{phase}``                                   1 for the current phase, 0 for the others
``round{phase}``                                   last server round finished in that phase
``rounds_completed_total{phase}``                  counter of finished rounds (the "round counter")
``round_duration_seconds{phase}``                  histogram of round wall time
``last_round_duration_seconds``                    wall time of the last round
``last_progress_timestamp_seconds``                unix time of the last phase change or finished round
``round_timeout_seconds``                          the configured per-round timeout (for the stall alert)
``sites_connected``                                SuperNodes currently connected
``round_sites{outcome}``                           sampled / replied / failed / rejected in the last round
``site_replies_total{outcome}``                    replied / failed counters over the run
``updates_rejected_total{reason}``                 updates refused by the update checks, by reason
``round_bytes{direction}``                         bytes sent / received in the last round
``bytes_total{direction}``                         bytes sent / received over the run
``train_metric{phase,name}``                       aggregated train metrics of the last round (e.g. loss)
``eval_metric{phase,name}``                        aggregated evaluation metrics of the last round
``site_epsilon{site}`` / ``site_epsilon_budget``   privacy spent / allowed per site
``checkpoint_timestamp_seconds`` / ``_age_seconds``  last checkpoint time and its age at scrape time
=================================================  =====================================================

Examples:
    >>> metrics = FederationMetrics(9464)              # http://127.0.0.1:9464/metrics
    >>> metrics.set_phase("pretrain", round_timeout_s=600)
    >>> metrics.round_finished("pretrain", 1, duration_s=84.2, sampled=3, replied=3, failed=0,
    ...                        bytes_sent=3 * 232_000_000, bytes_received=3 * 232_000_000,
    ...                        train_metrics={"loss": 0.081})
    >>> metrics.close()
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lungmae_core.errors import LungMAEError

__all__ = ["FederationMetrics", "METRICS_HOST_ENV", "MetricsServerError", "PHASES", "metric_name"]

logger = logging.getLogger(__name__)

METRICS_HOST_ENV = "LUNGMAE_METRICS_HOST"
PHASES = ("idle", "pretrain", "handoff", "finetune", "evaluate", "finished", "failed")
_ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, 7200, float("inf"))
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class MetricsServerError(LungMAEError, OSError):
    """The metrics HTTP endpoint could not be started (port in use, address not available)."""


def metric_name(key: str) -> str:
    """Turn a metric key from a reply (``"train-loss"``, ``"l1_masked"``) into a Prometheus label value."""
    return _NAME_RE.sub("_", key.replace("-", "_"))


class FederationMetrics:
    """The coordinator's Prometheus metrics, optionally served over HTTP.

    Args:
        port: TCP port of the ``/metrics`` endpoint; ``0`` picks a free port (see :attr:`port`); ``None``
            keeps the metrics in memory only (simulation, tests) and :meth:`render` still works.
        host: address to bind. Defaults to ``$LUNGMAE_METRICS_HOST`` or else ``"127.0.0.1"``: metrics stay on
            the coordinator unless IT binds them elsewhere on purpose (a container sets ``0.0.0.0``; the
            variable reaches the ServerApp process through the SuperLink's environment).

    Raises:
        MetricsServerError: when the endpoint cannot be bound, naming host, port and the fix.
    """

    def __init__(self, port: int | None, host: str | None = None) -> None:
        host = host or os.environ.get(METRICS_HOST_ENV) or "127.0.0.1"
        if port is not None and not (0 <= int(port) <= 65535):
            raise MetricsServerError(f"metrics-port must be between 0 and 65535 (0: any free port); got {port}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.host = host
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._last_checkpoint: float | None = None
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        r = self.registry
        self._phase_g = Gauge("lungmae_phase", "1 for the current phase of the federation, 0 otherwise",
                              ["phase"], registry=r)
        self._round_g = Gauge("lungmae_round", "Last server round finished in this phase", ["phase"], registry=r)
        self._rounds_c = Counter("lungmae_rounds_completed", "Rounds finished, by phase", ["phase"], registry=r)
        self._duration_h = Histogram("lungmae_round_duration_seconds", "Wall time of a round (configure, "
                                     "train at the sites, aggregate)", ["phase"], buckets=_ROUND_BUCKETS,
                                     registry=r)
        self._last_duration_g = Gauge("lungmae_last_round_duration_seconds", "Wall time of the last round",
                                      registry=r)
        self._progress_g = Gauge("lungmae_last_progress_timestamp_seconds",
                                 "Unix time of the last phase change or finished round", registry=r)
        self._timeout_g = Gauge("lungmae_round_timeout_seconds", "Configured timeout of one round", registry=r)
        self._connected_g = Gauge("lungmae_sites_connected", "SuperNodes connected to the SuperLink", registry=r)
        self._round_sites_g = Gauge("lungmae_round_sites", "Sites in the last round by outcome "
                                    "(sampled, replied, failed, rejected)", ["outcome"], registry=r)
        self._replies_c = Counter("lungmae_site_replies", "Site replies over the run by outcome (replied, "
                                  "failed)", ["outcome"], registry=r)
        self._rejected_c = Counter("lungmae_updates_rejected", "Updates refused by the update checks, by "
                                   "reason", ["reason"], registry=r)
        self._round_bytes_g = Gauge("lungmae_round_bytes", "Bytes sent to / received from sites in the last "
                                    "round", ["direction"], registry=r)
        self._bytes_c = Counter("lungmae_bytes", "Bytes sent to / received from sites over the run",
                                ["direction"], registry=r)
        self._train_g = Gauge("lungmae_train_metric", "Aggregated train metric of the last round",
                              ["phase", "name"], registry=r)
        self._eval_g = Gauge("lungmae_eval_metric", "Aggregated evaluation metric of the last round",
                             ["phase", "name"], registry=r)
        self._eps_g = Gauge("lungmae_site_epsilon", "Privacy budget epsilon spent by a site", ["site"], registry=r)
        self._eps_budget_g = Gauge("lungmae_site_epsilon_budget", "Privacy budget epsilon allowed for a site",
                                   ["site"], registry=r)
        self._ckpt_g = Gauge("lungmae_checkpoint_timestamp_seconds", "Unix time of the last checkpoint",
                             registry=r)
        self._ckpt_round_g = Gauge("lungmae_checkpoint_round", "Server round of the last checkpoint", ["phase"],
                                   registry=r)
        self._ckpt_age_g = Gauge("lungmae_checkpoint_age_seconds", "Seconds since the last checkpoint (NaN "
                                 "before the first one)", registry=r)
        self._ckpt_age_g.set_function(self._checkpoint_age)
        for outcome in ("replied", "failed"):
            self._replies_c.labels(outcome)  # export 0 from the start, so rate() and alerts see the series
        for direction in ("sent", "received"):
            self._bytes_c.labels(direction)
        self.set_phase("idle")
        if port is not None:
            self._serve(int(port), host)

    # ----------------------------------------------------------------------------------------- serving
    def _serve(self, port: int, host: str) -> None:
        from prometheus_client import start_http_server

        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise MetricsServerError(
                f"Unable to serve Prometheus metrics on {host}:{port} as {why}; set 'server: metrics-port' in "
                "federation.yaml to a free port (or 0 to pick one) and stop any older server process") from exc
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with ``port=0``); ``None`` when not serving."""
        return None if self._httpd is None else int(self._httpd.server_address[1])

    def render(self) -> str:
        """The current metrics in the Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stop the HTTP endpoint (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FederationMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- updates
    def set_phase(self, phase: str, *, round_timeout_s: float | None = None) -> None:
        """Mark ``phase`` as current (others go to 0) and restart the stall clock.

        Args:
            phase: one of :data:`PHASES` (``pretrain``, ``handoff``, ``finetune``, ``evaluate``, ``finished``,
                ``failed``, ``idle``); other names are accepted and exported as they are.
            round_timeout_s: the per-round timeout, exported for the "round stalled" alert.
        """
        with self._lock:
            for name in set(PHASES) | ({self._phase} if self._phase else set()):
                self._phase_g.labels(name).set(0)
            self._phase_g.labels(phase).set(1)
            self._phase = phase
            if round_timeout_s is not None:
                self._timeout_g.set(float(round_timeout_s))
            self._progress_g.set(time.time())

    @property
    def phase(self) -> str | None:
        """The current phase."""
        return self._phase

    def round_finished(
        self,
        phase: str,
        server_round: int,
        *,
        duration_s: float,
        sampled: int,
        replied: int,
        failed: int,
        rejected: Mapping[str, int] | None = None,
        bytes_sent: int = 0,
        bytes_received: int = 0,
        train_metrics: Mapping[str, float] | None = None,
        eval_metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Record one finished round (train and/or evaluate).

        Args:
            phase: the phase the round belongs to.
            server_round: the round number within the phase, as FedAvg counts it (1-based).
            duration_s: wall time of the round in seconds.
            sampled: sites sent an instruction; replied: sites that returned a reply;
                failed: error replies or timeouts.
            rejected: updates refused by the update checks, by reason (e.g. ``{"norm": 1, "non-finite": 0}``).
                Rejected updates are also counted in ``replied``.
            bytes_sent / bytes_received: payload bytes to / from the sites in this round.
            train_metrics / eval_metrics: aggregated metrics (``{"loss": 0.08, "accuracy": 0.71}``);
                non-numeric values are skipped.
        """
        rejected = dict(rejected or {})
        with self._lock:
            self._round_g.labels(phase).set(server_round)
            self._rounds_c.labels(phase).inc()
            self._duration_h.labels(phase).observe(max(0.0, float(duration_s)))
            self._last_duration_g.set(float(duration_s))
            n_rejected = sum(int(v) for v in rejected.values())
            for outcome, value in (("sampled", sampled), ("replied", replied), ("failed", failed),
                                   ("rejected", n_rejected)):
                self._round_sites_g.labels(outcome).set(int(value))
            self._replies_c.labels("replied").inc(max(0, int(replied)))
            self._replies_c.labels("failed").inc(max(0, int(failed)))
            for reason, count in rejected.items():
                self._rejected_c.labels(str(reason)).inc(max(0, int(count)))
            self._round_bytes_g.labels("sent").set(int(bytes_sent))
            self._round_bytes_g.labels("received").set(int(bytes_received))
            self._bytes_c.labels("sent").inc(max(0, int(bytes_sent)))
            self._bytes_c.labels("received").inc(max(0, int(bytes_received)))
            for gauge, values in ((self._train_g, train_metrics), (self._eval_g, eval_metrics)):
                for key, figure in (values or {}).items():
                    if isinstance(figure, bool) or not isinstance(figure, int | float):
                        continue
                    gauge.labels(phase, metric_name(key)).set(float(figure))
            self._progress_g.set(time.time())

    def site_epsilon(self, site: str, epsilon: float, budget: float | None = None) -> None:
        """Export the privacy budget spent by ``site`` (a site name or node id, never a path).

        Args:
            site: site label.
            epsilon: cumulative epsilon spent, as reported by the site.
            budget: the site's total epsilon budget, if known (for the "budget nearly spent" alert).
        """
        self._eps_g.labels(str(site)).set(float(epsilon))
        if budget is not None:
            self._eps_budget_g.labels(str(site)).set(float(budget))

    def checkpoint_written(self, phase: str, server_round: int, timestamp: float | None = None) -> None:
        """Record that the checkpoint of ``phase`` round ``server_round`` is on disk (age restarts at 0)."""
        ts = time.time() if timestamp is None else float(timestamp)
        with self._lock:
            self._last_checkpoint = ts
            self._ckpt_g.set(ts)
            self._ckpt_round_g.labels(phase).set(server_round)

    def sites_connected(self, count: int) -> None:
        """Export the number of SuperNodes connected now (``len(grid.get_node_ids())``)."""
        self._connected_g.set(int(count))

    def _checkpoint_age(self) -> float:
        last = self._last_checkpoint
        return math.nan if last is None else max(0.0, time.time() - last)
