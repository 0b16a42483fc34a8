"""`lungmae site ledger show|reset`: totals per run and phase, the lost-ledger refusal, the logged reset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.ledger import JOURNAL_NAME, LedgerMissingError, PrivacyLedger
from lungmae_cli.main import main
from lungmae_core.privacy import DPConfig, epsilon_for, plan_round


def _site(tmp_path: Path) -> Path:
    path = tmp_path / "north" / "site.yaml"
    path.parent.mkdir()
    path.write_text("site: {name: north}\ndata: {cache: cache}\n"
                    "privacy: {enabled: true, epsilon: 30.0, noise-multiplier: 1.0}\n")
    return path


def _spend(ledger: PrivacyLedger, rnd: int, phase: str, run: str) -> tuple[float, float, int]:
    plan = plan_round(DPConfig(enabled=True, epsilon=30.0, noise_multiplier=1.0), num_samples=20, batch_size=5,
                      epochs=1, delta=1e-5)
    ledger.settle(ledger.reserve(plan, phase=phase, server_round=rnd, run=run).id, steps_taken=plan.steps)
    return plan.history


def test_show_prints_spent_and_remaining_per_run_and_phase(tmp_path: Path, capsys) -> None:
    config = _site(tmp_path)
    state = tmp_path / "north" / "state"
    ledger = PrivacyLedger(state / "privacy-ledger.json", budget_epsilon=30.0, delta=1e-5, site="north")
    history = [_spend(ledger, 1, "pretrain", "4711"), _spend(ledger, 2, "pretrain", "4711"),
               _spend(ledger, 3, "finetune", "4711")]
    assert main(["site", "ledger", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    total = epsilon_for(history, 1e-5)
    assert f"privacy ledger {state / 'privacy-ledger.json'}" in out and "unit: patient   delta: 1e-05" in out
    assert f"epsilon spent {total:.3f} of 30.000; remaining {30 - total:.3f}" in out
    pretrain = epsilon_for(history[:2], 1e-5)
    assert any(line.split() == ["4711", "pretrain", "2", str(2 * history[0][2]), "20", f"{pretrain:.3f}"]
               for line in out.splitlines()), out
    assert main(["site", "ledger", "show", "--config", str(config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spent"] == pytest.approx(total) and len(summary["groups"]) == 2


def test_a_lost_ledger_is_shown_as_missing_and_reset_needs_a_reason(tmp_path: Path, capsys) -> None:
    config = _site(tmp_path)
    path = tmp_path / "north" / "state" / "privacy-ledger.json"
    ledger = PrivacyLedger(path, budget_epsilon=30.0, delta=1e-5, site="north")
    _spend(ledger, 1, "pretrain", "1")
    path.unlink()
    assert main(["site", "ledger", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "MISSING while the site shows earlier DP work" in out and "lungmae site ledger reset" in out
    assert main(["site", "ledger", "reset", "--config", str(config)]) == 2
    assert "Unable to reset the privacy ledger without a reason" in capsys.readouterr().err
    with pytest.raises(LedgerMissingError):
        PrivacyLedger(path, budget_epsilon=30.0, delta=1e-5).reserve(
            plan_round(DPConfig(enabled=True, epsilon=30.0, noise_multiplier=1.0), num_samples=20, batch_size=5,
                       epochs=1, delta=1e-5), phase="pretrain", server_round=2)
    assert main(["site", "ledger", "reset", "--config", str(config), "--reason", "disk lost; DPO agreed"]) == 0
    assert "reset by" in capsys.readouterr().out
    events = json.loads((path.parent / JOURNAL_NAME).read_text())["events"]
    assert [e["event"] for e in events] == ["created", "reset"] and events[-1]["reason"] == "disk lost; DPO agreed"
    _spend(PrivacyLedger(path, budget_epsilon=30.0, delta=1e-5, site="north"), 2, "pretrain", "1")  # allowed now
