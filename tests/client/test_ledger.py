"""The site's privacy ledger: composition equals Opacus' accountant, refusals, restarts, atomic writes, bad files,
the journal that makes a lost ledger a refusal, the explicit reset, and the per-run/phase summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.ledger import (
    JOURNAL_NAME,
    LEDGER_FORMAT,
    RESET_COMMAND,
    LedgerError,
    LedgerMissingError,
    PrivacyLedger,
)
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
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json", "ledger.json.lock", JOURNAL_NAME]
    assert path.stat().st_mode & 0o777 == 0o600 and data["unit"] == "patient"


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


def _spend(ledger: PrivacyLedger, rnd: int = 1, phase: str = "pretrain", run: str = "11") -> None:
    plan = _plan()
    ledger.settle(ledger.reserve(plan, phase=phase, server_round=rnd, run=run).id, steps_taken=plan.steps)


def test_a_deleted_ledger_is_refused_until_an_explicit_reset(tmp_path: Path, caplog) -> None:
    path = tmp_path / "state" / "privacy-ledger.json"
    ledger = PrivacyLedger(path, budget_epsilon=50.0, delta=DELTA, site="north")
    _spend(ledger)
    spent = ledger.epsilon_spent()
    path.unlink()  # lost, or deleted to get a fresh budget
    again = PrivacyLedger(path, budget_epsilon=50.0, delta=DELTA, site="north")
    with pytest.raises(LedgerMissingError) as err:
        again.reserve(_plan(), phase="pretrain", server_round=2)
    message = str(err.value)
    assert "privacy ledger (privacy-ledger.json) is missing while its state shows earlier DP work" in message
    assert RESET_COMMAND in message and str(tmp_path) not in message  # sent to the server: no path
    with pytest.raises(LedgerMissingError):
        again.epsilon_spent()  # 0.0 would be a lie
    with pytest.raises(LedgerError, match="without a reason"):
        again.reset(reason=" ")
    caplog.set_level("WARNING", logger="client.ledger")
    event = again.reset(reason="ledger lost in disk failure; DPO approved", operator="dpo@north")
    assert event["event"] == "reset" and event["by"] == "dpo@north" and event["archived"] is None
    assert "reset by dpo@north: ledger lost in disk failure" in caplog.text
    _spend(again, rnd=2)
    data = json.loads(path.read_text())
    assert data["resets"][0]["reason"] == "ledger lost in disk failure; DPO approved"
    assert [e["event"] for e in again.journal()] == ["created", "reset", "created"]
    assert again.epsilon_spent() == pytest.approx(spent)  # one round in the new ledger


def test_reset_archives_the_old_ledger_and_records_what_it_had_spent(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, budget_epsilon=50.0, delta=DELTA)
    _spend(ledger)
    spent = ledger.epsilon_spent()
    event = ledger.reset(reason="new consortium agreement, DPO signed", operator="it")
    assert not path.exists() and (tmp_path / event["archived"]).is_file()
    assert event["epsilon_spent_before"] == pytest.approx(spent) and event["entries_before"] == 1
    assert ledger.epsilon_spent() == 0.0  # the reset itself is the acknowledgement


def test_a_witness_outside_the_state_folder_also_refuses(tmp_path: Path) -> None:
    witness = tmp_path / "cache" / "dp-witness.json"
    witness.parent.mkdir()
    witness.write_text("{}")
    ledger = PrivacyLedger(tmp_path / "state" / "l.json", budget_epsilon=5.0, delta=DELTA, witnesses=[witness])
    with pytest.raises(LedgerMissingError):  # the whole state folder is gone, the cache still knows
        ledger.reserve(_plan(), phase="pretrain", server_round=1)


def test_an_edited_journal_is_not_trusted(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json", budget_epsilon=50.0, delta=DELTA)
    _spend(ledger)
    ledger.reset(reason="test reset", operator="x")
    journal = tmp_path / JOURNAL_NAME
    data = json.loads(journal.read_text())
    data["events"] = data["events"][1:]  # drop the first event
    journal.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="event 1 does not continue its hash chain"):
        ledger.reserve(_plan(), phase="pretrain", server_round=2)


def test_an_old_per_scan_ledger_is_refused_with_the_reset_command(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"format": "lungmae-privacy-ledger/1", "delta": 1e-3, "entries": []}))
    with pytest.raises(LedgerError, match="old format 'lungmae-privacy-ledger/1', which accounted per scan"):
        PrivacyLedger(path, budget_epsilon=5.0, delta=None)


def test_summary_per_run_and_phase(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json", budget_epsilon=50.0, delta=DELTA)
    _spend(ledger, 1, "pretrain", "11")
    _spend(ledger, 2, "pretrain", "11")
    _spend(ledger, 3, "finetune", "11")
    _spend(ledger, 1, "finetune", "12")
    summary = ledger.summary()
    groups = {(g["run"], g["phase"]): g for g in summary["groups"]}
    assert list(groups) == [("11", "pretrain"), ("11", "finetune"), ("12", "finetune")]
    one = epsilon_for([_plan().history], DELTA)
    assert groups[("11", "pretrain")]["epsilon"] == pytest.approx(epsilon_for([_plan().history] * 2, DELTA))
    assert groups[("12", "finetune")]["epsilon"] == pytest.approx(one) and groups[("12", "finetune")]["rounds"] == 1
    assert summary["spent"] == pytest.approx(epsilon_for([_plan().history] * 4, DELTA))
    assert summary["remaining"] == pytest.approx(50.0 - summary["spent"]) and summary["unit"] == "patient"
