"""A site's own Prometheus metrics, for the hospital's monitoring: served by `lungmae site start` on 127.0.0.1.

Each message runs in a fresh ClientApp process, so the long-lived `lungmae site start` wrapper serves the
metrics and reads the site's files at scrape time: the manifest (samples per split), the privacy ledger
(epsilon spent, budget, the last DP round's training time) and, when the site trains on a GPU, its memory.
They stay at the hospital (loopback only unless IT binds otherwise) and hold aggregates only.

Examples:
    >>> metrics = SiteMetrics(load_site_config("site.yaml"))
    >>> metrics.serve(9100)            # http://127.0.0.1:9100/metrics
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["SiteMetrics"]

log = logging.getLogger(__name__)


def _seconds_between(start: str, end: str) -> float | None:
    try:
        return (_dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


class SiteMetrics(Collector):
    """Collector of one site's metrics; every value is read fresh at scrape time.

    Metrics: ``lungmae_site_up`` (1 while the SuperNode runs), ``lungmae_site_samples{split}``,
    ``lungmae_site_epsilon_spent``, ``lungmae_site_epsilon_budget``, ``lungmae_site_epsilon_left``,
    ``lungmae_site_dp_rounds``, ``lungmae_site_last_round_seconds`` (reserve -> settle of the last DP round),
    ``lungmae_site_gpu_memory_bytes{kind="total"|"free"}`` (CUDA sites), ``lungmae_site_scrape_errors``.

    Args:
        site_cfg: the loaded ``site.yaml`` (``client.site_config.SiteConfig``).
    """

    def __init__(self, site_cfg: Any) -> None:
        self.cfg = site_cfg
        self.up = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._torch: Any = None

    # ----------------------------------------------------------------------------------------- reading
    def _samples(self) -> Counter[str]:
        from lungmae_core.manifest import read_manifest

        cache = self.cfg.data.cache
        if cache is None or not (Path(cache) / "manifest.csv").exists():
            return Counter()
        return Counter(r.split or "none" for r in read_manifest(cache) if r.status == "accepted")

    def _ledger(self) -> dict[str, Any] | None:
        dp = self.cfg.privacy
        if not dp.enabled:
            return None
        path = Path(dp.ledger)  # load_site_config always sets it (default: <state-dir>/privacy-ledger.json)
        if not Path(path).exists():
            return {"epsilon_total": 0.0, "rounds": 0, "last_seconds": None}
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = data.get("entries", [])
        last = entries[-1] if entries else {}
        return {"epsilon_total": float(last.get("epsilon_total", 0.0)), "rounds": len(entries),
                "last_seconds": _seconds_between(last.get("reserved_at", ""), last.get("settled_at", ""))}

    def _gpu(self) -> tuple[int, int] | None:
        if self.cfg.training.device == "cpu":
            return None
        if self._torch is None:
            import torch

            self._torch = torch
        if not self._torch.cuda.is_available():
            return None
        free, total = self._torch.cuda.mem_get_info()
        return int(total), int(free)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the metric families (called by prometheus_client on every scrape)."""
        errors = 0

        def read(problem: str, source: Callable[[], Any]) -> Any:
            """``source()``, or None after logging and counting the failure: a scrape must never fail."""
            nonlocal errors
            try:
                return source()
            except Exception as exc:
                log.warning("site metrics: %s: %s", problem, exc)
                errors += 1
                return None

        yield GaugeMetricFamily("lungmae_site_up", "1 while this site's SuperNode runs", value=self.up)
        samples = GaugeMetricFamily("lungmae_site_samples", "Accepted scans in the prepared cache, by split",
                                    labels=["split"])
        for split, n in sorted((read("manifest unreadable", self._samples) or {}).items()):
            samples.add_metric([split], n)
        yield samples
        ledger = read("privacy ledger unreadable", self._ledger)
        if ledger is not None:
            budget = float(self.cfg.privacy.epsilon or 0.0)
            yield GaugeMetricFamily("lungmae_site_epsilon_spent", "Privacy budget epsilon spent (ledger)",
                                    value=ledger["epsilon_total"])
            yield GaugeMetricFamily("lungmae_site_epsilon_budget", "Privacy budget epsilon allowed", value=budget)
            yield GaugeMetricFamily("lungmae_site_epsilon_left", "Privacy budget epsilon left",
                                    value=max(0.0, budget - ledger["epsilon_total"]))
            yield GaugeMetricFamily("lungmae_site_dp_rounds", "DP-SGD rounds recorded in the ledger",
                                    value=ledger["rounds"])
            if ledger["last_seconds"] is not None:
                yield GaugeMetricFamily("lungmae_site_last_round_seconds", "Local training time of the last DP "
                                        "round (reserve to settle)", value=ledger["last_seconds"])
        gpu = read("GPU query failed", self._gpu)
        if gpu is not None:
            memory = GaugeMetricFamily("lungmae_site_gpu_memory_bytes", "GPU memory", labels=["kind"])
            memory.add_metric(["total"], gpu[0])
            memory.add_metric(["free"], gpu[1])
            yield memory
        yield GaugeMetricFamily("lungmae_site_scrape_errors", "Sources that could not be read in this scrape",
                                value=errors)

    # ----------------------------------------------------------------------------------------- serving
    def render(self) -> str:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the bound port."""
        from prometheus_client import start_http_server

        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._httpd.server_address[1])
        log.info("site metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
