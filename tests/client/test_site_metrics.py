"""Tests for client/site_metrics.py: a site's metrics, read from its manifest and privacy ledger at scrape time."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from client.site_config import load_site_config
from client.site_metrics import SiteMetrics
from lungmae_core.manifest import ManifestRow, write_manifest


def _values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _site(tmp_path: Path, privacy: dict | None = None) -> Path:
    cache = tmp_path / "cache"
    rows = [ManifestRow(series_id=f"s{i}", patient_id=f"p{i}", study_id=f"t{i}", source="dicom", status="accepted",
                        split=split, cache_file=f"samples/{i}.npz")
            for i, split in enumerate(["train", "train", "val", "test", ""])]
    rows.append(ManifestRow(series_id="r", patient_id="p9", study_id="t9", source="dicom", status="rejected",
                            reason="scout"))
    write_manifest(cache, rows)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": "north"}, "data": {"cache": "cache"},
                                    "training": {"device": "cpu"}, "privacy": privacy or {"enabled": False}}))
    return path


def test_samples_per_split_and_no_dp(tmp_path: Path) -> None:
    metrics = SiteMetrics(load_site_config(_site(tmp_path)))
    v = _values(metrics.render())
    assert v[("lungmae_site_samples", (("split", "train"),))] == 2
    assert v[("lungmae_site_samples", (("split", "none"),))] == 1
    assert v[("lungmae_site_up", ())] == 0 and v[("lungmae_site_scrape_errors", ())] == 0
    assert not any(name.startswith("lungmae_site_epsilon") for name, _ in v)


def test_epsilon_from_the_ledger_read_at_scrape_time(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    cfg = load_site_config(_site(tmp_path, {"enabled": True, "epsilon": 3.0, "noise-multiplier": 1.0,
                                            "ledger": str(ledger)}))
    metrics = SiteMetrics(cfg)
    assert _values(metrics.render())[("lungmae_site_epsilon_left", ())] == 3.0
    ledger.write_text(json.dumps({"entries": [
        {"epsilon_total": 1.25, "reserved_at": "2026-01-01T10:00:00+00:00",
         "settled_at": "2026-01-01T10:00:42+00:00"}]}))
    v = _values(metrics.render())
    assert v[("lungmae_site_epsilon_spent", ())] == 1.25 and v[("lungmae_site_epsilon_left", ())] == 1.75
    assert v[("lungmae_site_last_round_seconds", ())] == 42 and v[("lungmae_site_dp_rounds", ())] == 1
    ledger.write_text("{")
    assert _values(metrics.render())[("lungmae_site_scrape_errors", ())] == 1  # a broken file never breaks a scrape


def test_default_ledger_is_the_state_dirs(tmp_path: Path) -> None:
    """Without ``privacy.ledger`` the ledger read is ``<state-dir>/privacy-ledger.json``, not one in the cache."""
    cfg = load_site_config(_site(tmp_path, {"enabled": True, "epsilon": 3.0, "noise-multiplier": 1.0}))
    (tmp_path / "cache" / "privacy-ledger.json").write_text(json.dumps({"entries": [{"epsilon_total": 2.5}]}))
    state = Path(cfg.site.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "privacy-ledger.json").write_text(json.dumps({"entries": [{"epsilon_total": 0.5}]}))
    v = _values(SiteMetrics(cfg).render())
    assert v[("lungmae_site_epsilon_spent", ())] == 0.5 and v[("lungmae_site_dp_rounds", ())] == 1


def test_served_on_loopback(tmp_path: Path) -> None:
    metrics = SiteMetrics(load_site_config(_site(tmp_path)))
    port = metrics.serve(0)
    try:
        metrics.up = 1
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert "lungmae_site_up 1.0" in body
