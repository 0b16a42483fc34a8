"""`lungmae simulate` end to end under Flower's Ray simulation runtime: 2 sites, 1 + 1 rounds, small volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungmae_cli.main import main


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_simulate_two_sites_one_plus_one_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = tmp_path / "federation.yaml"
    fed.write_text(
        "model: {name: tiny, overrides: {img-size: 32, depth: 2, decoder-depth: 1}}\n"
        "phases:\n"
        "  pretrain: {rounds: 1, local-epochs: 1, min-sites: 2}\n"
        "  finetune: {rounds: 1, local-epochs: 1, min-sites: 2}\n"
        "compression: int8\n")
    code = main(["simulate", "--sites", "2", "--scans-per-site", "5", "--workdir", str(tmp_path / "w"),
                 "--federation-config", str(fed), "--no-report"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = tmp_path / "w" / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["phase"]) for x in lines] == [(1, "pretrain"), (2, "finetune")]
    assert all(sorted(x["participation"]["replied"]) == ["site0", "site1"] for x in lines)
    assert all(x["bytes"]["up"] > 0 and not x["rejected_updates"] for x in lines)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and set(summary["final"]["sites"]) <= {"site0", "site1"}
    assert {"accuracy", "balanced_accuracy", "weighted_f1", "roc_auc"} <= set(summary["final"]["pooled"])
    assert (run / "model" / "manifest.json").exists() and (run / "state.json").exists()
    assert "step 3/5  finetune 1/1" in out and f"metrics: {run / 'metrics.json'}" in out
    # the cross-site step under Ray: both synthetic sites share a local model (int8 updates), both score all three
    assert "step 5/5  cross-site evaluation" in out
    cross = summary["final"]["cross_site"]
    assert cross["models"] == ["global", "site0", "site1"] and cross["data_sites"] == ["site0", "site1"]
    assert cross["notes"] == {"models": {}, "cells": [], "not_shared": {}}
    assert all(v is not None for row in cross["metrics"]["accuracy"] for v in row)
