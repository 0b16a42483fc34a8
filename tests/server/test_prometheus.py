"""Tests for server/prometheus.py: the coordinator's metrics, scraped over real HTTP on loopback."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.prometheus import FederationMetrics, MetricsServerError


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_round_lifecycle_is_exported() -> None:
    m = FederationMetrics(None)
    m.set_phase("pretrain", round_timeout_s=600)
    m.sites_connected(3)
    m.round_finished("pretrain", 1, duration_s=12.5, sampled=3, replied=2, failed=1,
                     rejected={"norm": 1}, bytes_sent=3000, bytes_received=2000,
                     train_metrics={"train-loss": 0.25, "num-examples": 40, "note": "x"},
                     eval_metrics={"l1_masked": 0.1})
    m.round_finished("pretrain", 2, duration_s=10.0, sampled=3, replied=3, failed=0, bytes_sent=3000)
    m.site_epsilon("hospital-a", 1.5, budget=8.0)
    m.checkpoint_written("pretrain", 2)
    s = _samples(m.render())
    assert s[("lungmae_phase", (("phase", "pretrain"),))] == 1
    assert s[("lungmae_phase", (("phase", "idle"),))] == 0
    assert s[("lungmae_round", (("phase", "pretrain"),))] == 2
    assert s[("lungmae_rounds_completed_total", (("phase", "pretrain"),))] == 2
    assert s[("lungmae_round_duration_seconds_count", (("phase", "pretrain"),))] == 2
    assert s[("lungmae_round_sites", (("outcome", "replied"),))] == 3
    assert s[("lungmae_site_replies_total", (("outcome", "failed"),))] == 1
    assert s[("lungmae_updates_rejected_total", (("reason", "norm"),))] == 1
    assert s[("lungmae_bytes_total", (("direction", "sent"),))] == 6000
    assert s[("lungmae_round_bytes", (("direction", "received"),))] == 0
    assert s[("lungmae_train_metric", (("name", "train_loss"), ("phase", "pretrain")))] == 0.25
    assert ("lungmae_train_metric", (("name", "note"), ("phase", "pretrain"))) not in s
    assert s[("lungmae_eval_metric", (("name", "l1_masked"), ("phase", "pretrain")))] == 0.1
    assert s[("lungmae_site_epsilon", (("site", "hospital-a"),))] == 1.5
    assert s[("lungmae_site_epsilon_budget", (("site", "hospital-a"),))] == 8.0
    assert s[("lungmae_sites_connected", ())] == 3
    assert s[("lungmae_round_timeout_seconds", ())] == 600
    assert 0 <= s[("lungmae_checkpoint_age_seconds", ())] < 5


def test_phase_switch_and_checkpoint_age_before_first_checkpoint() -> None:
    m = FederationMetrics(None)
    assert math.isnan(_samples(m.render())[("lungmae_checkpoint_age_seconds", ())])
    m.set_phase("pretrain")
    m.set_phase("finetune")
    s = _samples(m.render())
    assert s[("lungmae_phase", (("phase", "pretrain"),))] == 0
    assert s[("lungmae_phase", (("phase", "finetune"),))] == 1
    assert m.phase == "finetune"


def test_served_over_http_on_loopback_and_closed() -> None:
    with FederationMetrics(0) as m:
        assert m.port and m.host == "127.0.0.1"
        m.round_finished("finetune", 4, duration_s=1, sampled=2, replied=2, failed=0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10).read().decode()
        assert 'lungmae_round{phase="finetune"} 4.0' in body
        port = m.port
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_instances_do_not_share_metrics() -> None:
    a, b = FederationMetrics(None), FederationMetrics(None)
    a.sites_connected(5)
    assert _samples(b.render())[("lungmae_sites_connected", ())] == 0


def test_port_in_use_gives_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(MetricsServerError,
                           match=rf"127.0.0.1:{port} as the port is in use; set 'server: metrics-port'"):
            FederationMetrics(port)


def test_bad_port_is_refused() -> None:
    with pytest.raises(MetricsServerError, match="between 0 and 65535"):
        FederationMetrics(70000)
