"""The site's privacy ledger: composition equals Opacus' accountant, refusals, restarts, atomic writes, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.ledger import LEDGER_FORMAT, LedgerError, PrivacyLedger
from lungmae_core.errors import PrivacyBudgetExceeded
from lungmae_core.privacy import DPConfig, RoundPlan, epsilon_for, plan_round

DELTA = 1e-4


def _plan(sigma: float = 1.0, n: int = 20, batch: int = 5, epochs: int = 2) -> RoundPlan:
    return plan_round(DPConfig(enabled=True, epsilon=100.0, noise_multiplier=sigma), num_samples=n,
                      batch_size=batch, epochs=epochs, delta=DELTA)


def test_epsilon_equals_opacus_accountant_stepped_through_the_same_rounds(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=100.0, delta=DELTA, site="north")
    accountant = RDPAccountant()
    for phase, plan, taken in [("pretrain", _plan(1.0), 8), ("pretrain", _plan(1.2, n=30), 5),
                               ("finetune", _plan(0.9, n=12, batch=4), 6)]:
        entry = ledger.reserve(plan, phase=phase, server_round=1)
        assert entry.status == "reserved" and entry.steps == plan.steps
        settled = ledger.settle(entry.id, steps_taken=taken)
        assert settled.status == "trained" and settled.steps == taken and settled.planned_steps == plan.steps
        for _ in range(taken):
            accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert ledger.epsilon_spent() == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-12)
    assert [e.phase for e in ledger.entries()] == ["pretrain", "pretrain", "finetune"]


def test_budget_allows_k_rounds_then_refuses_and_a_restart_still_refuses(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    plan = _plan(1.0)
    one, two, three = (epsilon_for([plan.history] * k, DELTA) for k in (1, 2, 3))
    cap = (two + three) / 2  # room for exactly 2 rounds
    ledger = PrivacyLedger(path, budget_epsilon=cap, delta=DELTA, site="north")
    for rnd in (1, 2):
        entry = ledger.reserve(plan, phase="pretrain", server_round=rnd)
        ledger.settle(entry.id, steps_taken=plan.steps)
    with pytest.raises(PrivacyBudgetExceeded) as err:
        ledger.reserve(plan, phase="pretrain", server_round=3)
    assert (f"Unable to train pretrain round 3 as it would bring this site's privacy spend to epsilon "
            f"{three:.3f}, over its budget {cap:.3f}") in str(err.value)
    assert f"spent so far: {two:.3f} in 2 round(s)" in str(err.value)
    restarted = PrivacyLedger(path, budget_epsilon=cap, delta=None, site="north")  # a new process
    assert restarted.epsilon_spent() == pytest.approx(two)
    with pytest.raises(PrivacyBudgetExceeded):
        restarted.reserve(plan, phase="finetune", server_round=4)
    refusals = restarted.refusals()
    assert [(r["phase"], r["server_round"]) for r in refusals] == [("pretrain", 3), ("finetune", 4)]
    assert len(restarted.entries()) == 2 and one < two < three


def test_a_reservation_counts_in_full_until_settled(tmp_path: Path) -> None:
    plan = _plan()
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=50.0, delta=DELTA)
    ledger.reserve(plan, phase="pretrain", server_round=1)  # e.g. killed while training
    assert PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=50.0, delta=None).epsilon_spent() \
        == pytest.approx(plan.epsilon_round)


def test_settling_more_steps_than_reserved_is_an_error(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=50.0, delta=DELTA)
    entry = ledger.reserve(_plan(), phase="pretrain", server_round=1)
    with pytest.raises(LedgerError, match=f"Unable to settle ledger entry 1 with {entry.steps + 1} DP-SGD steps as "
                                          f"only {entry.steps} were reserved"):
        ledger.settle(entry.id, steps_taken=entry.steps + 1)
    with pytest.raises(LedgerError, match="as it has no such entry"):
        ledger.settle(99, steps_taken=1)


def test_writes_are_atomic_json_and_leave_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "site" / "ledger.json"
    ledger = PrivacyLedger(path, budget_epsilon=50.0, delta=DELTA, site="north")
    ledger.settle(ledger.reserve(_plan(), phase="pretrain", server_round=1).id, steps_taken=3)
    data = json.loads(path.read_text())
    assert data["format"] == LEDGER_FORMAT and data["delta"] == DELTA and data["site"] == "north"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json", "ledger.json.lock"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON (line 1"),
    ('{"format": "other/9", "delta": 1e-5, "entries": []}', "as its 'format' is 'other/9'"),
    (json.dumps({"format": LEDGER_FORMAT, "delta": 2.0, "entries": []}), "as its 'delta' is 2.0"),
    (json.dumps({"format": LEDGER_FORMAT, "delta": 1e-5, "entries": {}}), "as 'entries' is not a list"),
    (json.dumps({"format": LEDGER_FORMAT, "delta": 1e-5, "entries": [{"id": 1}]}), "entry 1 has keys ['id']"),
])
def test_a_damaged_ledger_refuses_instead_of_starting_over(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError) as err:
        PrivacyLedger(path, budget_epsilon=5.0, delta=None).reserve(_plan(), phase="pretrain", server_round=1)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_changed_delta_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, budget_epsilon=50.0, delta=DELTA).reserve(_plan(), phase="pretrain", server_round=1)
    with pytest.raises(LedgerError, match="states epsilons at delta 0.0001 but site.yaml now sets delta 1e-05"):
        PrivacyLedger(path, budget_epsilon=5.0, delta=1e-5)


def test_bad_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="the budget epsilon must be > 0; got 0"):
        PrivacyLedger(tmp_path / "l.json", budget_epsilon=0, delta=DELTA)
