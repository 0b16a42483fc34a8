"""The privacy gate: requirement checks, default delta, patients as the unit, settle after training, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.ledger import PrivacyLedger
from client.privacy_gate import PrivacyGate, PrivacyRequirement, PrivacyRequirementNotMet, refusal_reason
from lungmae_core.errors import ConfigError, PrivacyBudgetExceeded
from lungmae_core.privacy import DPConfig, is_privacy_refusal

ROOT = Path(__file__).resolve().parents[2]
DP = DPConfig(enabled=True, epsilon=20.0, noise_multiplier=1.0, max_grad_norm=1.0)


class Records(TensorDataset):
    """``n`` random (x, y) records, ``per_patient`` of them per pseudonymous patient."""

    def __init__(self, n: int = 8, per_patient: int = 1) -> None:
        super().__init__(torch.randn(n, 3), torch.randn(n, 1))
        self.patient_ids = [f"pat-{i // per_patient}" for i in range(n)]


def _train_linear(privacy, steps_wanted: int | None = None) -> None:
    """A few real DP-SGD steps on a linear model (the hook is model-agnostic)."""
    data = Records()
    model = nn.Linear(3, 1)
    model, opt, loader = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                              DataLoader(data, batch_size=2))
    done = 0
    for x, y in loader:
        if steps_wanted is not None and done >= steps_wanted:
            break
        opt.zero_grad()
        if len(x):
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        done += 1


def test_disabled_site_trains_without_dp_unless_the_federation_requires_it(tmp_path: Path) -> None:
    gate = PrivacyGate.for_site(DPConfig(), ledger_path=tmp_path / "l.json", num_patients=8)
    with gate.round(phase="pretrain", server_round=1, num_samples=8, batch_size=2, epochs=1) as privacy:
        assert privacy is None
    assert gate.epsilon_spent() == 0.0 and not (tmp_path / "l.json").exists()
    with pytest.raises(PrivacyRequirementNotMet, match="the federation requires differential privacy and this "
                                                       "site has privacy.enabled false"):
        with gate.round(phase="pretrain", server_round=1, num_samples=8, batch_size=2, epochs=1,
                        requirement=PrivacyRequirement(require_dp=True)):
            pass


def test_pretraining_trains_the_whole_mae(tmp_path: Path) -> None:
    gate = PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=8)
    with gate.round(phase="pretrain", server_round=1, num_samples=8, batch_size=2, epochs=1) as privacy:
        assert privacy.trainable is None
        _train_linear(privacy)


def test_a_round_over_the_per_round_limit_is_refused_and_not_recorded(tmp_path: Path) -> None:
    gate = PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=8)
    plan = gate.plan(phase="pretrain", num_samples=8, batch_size=2, epochs=1)
    with pytest.raises(PrivacyRequirementNotMet) as err:
        with gate.round(phase="pretrain", server_round=1, num_samples=8, batch_size=2, epochs=1,
                        requirement=PrivacyRequirement.from_config({"require-dp": True,
                                                                    "max-epsilon-per-round": 0.5})):
            pass
    assert (f"this round would cost epsilon {plan.epsilon_round:.3f} (noise multiplier 1, 4 steps at sample "
            "rate 0.25), over the federation's limit of 0.5 per round") in str(err.value)
    assert is_privacy_refusal(refusal_reason(err.value))
    assert gate.epsilon_spent() == 0.0 and gate.ledger.entries() == []


def test_requirement_from_config_rejects_bad_types() -> None:
    assert PrivacyRequirement.from_config({}) == PrivacyRequirement()
    assert PrivacyRequirement(True, 2.0).to_config() == {"require-dp": True, "max-epsilon-per-round": 2.0}
    with pytest.raises(PrivacyRequirementNotMet, match="'max-epsilon-per-round' is 'x'; expected a bool and a number"):
        PrivacyRequirement.from_config({"max-epsilon-per-round": "x"})


def test_default_delta_is_fixed_when_the_ledger_is_created(tmp_path: Path) -> None:
    gate = PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=8)
    assert gate.ledger.delta == pytest.approx(1e-5)  # min(1e-5, 1/(10 N)), not 1/80
    with gate.round(phase="finetune", server_round=1, num_samples=8, batch_size=2, epochs=1) as privacy:
        _train_linear(privacy)
    later = PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=50_000)  # more patients later
    assert later.ledger.delta == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match=r"Unable to use delta 1e-05 \(the privacy ledger .*\) as it is above 1/N"):
        PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=500_000)  # the fixed delta is now loose
    big = PrivacyGate.for_site(DP, ledger_path=tmp_path / "big.json", num_patients=1_000_000)
    assert big.ledger.delta == pytest.approx(1e-7)


def test_a_delta_above_one_over_n_patients_is_refused(tmp_path: Path) -> None:
    loose = DPConfig(enabled=True, epsilon=8.0, noise_multiplier=1.0, delta=0.05)
    with pytest.raises(ConfigError, match=r"Unable to use delta 0.05 \(site.yaml privacy.delta\) as it is above "
                                          r"1/N = 0.0333 for this site's 30 patients.*Use at most 1e-05"):
        PrivacyGate.for_site(loose, ledger_path=tmp_path / "l.json", num_patients=30)
    assert PrivacyGate.for_site(loose, ledger_path=tmp_path / "l.json", num_patients=10).ledger.delta == 0.05


def test_the_unit_is_the_patient_not_the_scan(tmp_path: Path) -> None:
    """Twelve scans of four patients: the plan samples patients, so a patient's three scans are one record."""
    gate = PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=4)
    data = Records(12, per_patient=3)
    with gate.round(phase="finetune", server_round=1, dataset=data, batch_size=2, epochs=1, run="7") as privacy:
        assert privacy.plan.num_samples == 4 and privacy.plan.sample_rate == 0.5
        assert privacy.trainable == "linear-probe"  # DP fine-tuning trains the head by default
        model = nn.Linear(3, 1)
        model, opt, loader = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                  DataLoader(data, batch_size=2))
        assert len(loader.dataset) == 4
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    [entry] = gate.ledger.entries()
    assert (entry.unit, entry.num_units, entry.run) == ("patient", 4, "7")
    with pytest.raises(ConfigError, match="the dataset TensorDataset has no patient ids; the unit of DP accounting "
                                          "is the patient"):
        with gate.round(phase="finetune", server_round=2, dataset=TensorDataset(torch.randn(4, 3)), batch_size=2,
                        epochs=1):
            pass


def test_round_settles_the_steps_really_taken_even_when_training_fails(tmp_path: Path) -> None:
    gate = PrivacyGate.for_site(DP, ledger_path=tmp_path / "l.json", num_patients=8)
    with gate.round(phase="finetune", server_round=1, num_samples=8, batch_size=2, epochs=2) as privacy:
        _train_linear(privacy)
    first = gate.ledger.entries()[0]
    assert (first.status, first.steps, first.planned_steps) == ("trained", 4, 8)  # one pass of the two planned
    with pytest.raises(RuntimeError, match="diverged"):
        with gate.round(phase="finetune", server_round=2, num_samples=8, batch_size=2, epochs=2) as privacy:
            _train_linear(privacy, steps_wanted=3)
            raise RuntimeError("diverged")
    second = gate.ledger.entries()[1]
    assert (second.status, second.steps) == ("trained", 3)
    assert gate.epsilon_spent() == pytest.approx(
        PrivacyLedger(tmp_path / "l.json", budget_epsilon=20.0, delta=None).epsilon_spent())


def test_budget_refusal_through_the_gate(tmp_path: Path) -> None:
    small = DPConfig(enabled=True, epsilon=5.5, noise_multiplier=1.0)  # one round: 4.87, two: 6.25 (delta 1e-5)
    gate = PrivacyGate.for_site(small, ledger_path=tmp_path / "l.json", num_patients=8)
    with gate.round(phase="pretrain", server_round=1, num_samples=8, batch_size=2, epochs=1) as privacy:
        _train_linear(privacy)
    with pytest.raises(PrivacyBudgetExceeded, match="to epsilon 6.253, over its budget 5.500"):
        with gate.round(phase="pretrain", server_round=2, num_samples=8, batch_size=2, epochs=1):
            pass


_KILLED_SITE = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from client.privacy_gate import PrivacyGate
    from lungmae_core.privacy import DPConfig
    where, ledger = sys.argv[1], sys.argv[2]
    gate = PrivacyGate.for_site(DPConfig(enabled=True, epsilon=20.0, noise_multiplier=1.0), ledger_path=ledger,
                                num_patients=8)
    with gate.round(phase="pretrain", server_round=1, num_samples=8, batch_size=2, epochs=2) as privacy:
        data = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
        data.patient_ids = [f"pat-{i}" for i in range(8)]
        model = nn.Linear(3, 1)
        model, opt, loader = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                  DataLoader(data, batch_size=2))
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if where == "training":
                print("TRAINING", flush=True)
                time.sleep(60)
    print("SETTLED", flush=True)  # the weights would be sent now
    time.sleep(60)
""")


@pytest.mark.parametrize("where, status, steps", [("training", "reserved", 8), ("settled", "trained", 4)])
def test_sigkill_at_any_point_never_under_counts(tmp_path: Path, where: str, status: str, steps: int) -> None:
    """Kill the site process mid-training (weights could be anywhere) or after settling (about to reply)."""
    ledger_path = tmp_path / "ledger.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SITE, where, str(ledger_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() in ("TRAINING", "SETTLED"), proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ledger = PrivacyLedger(ledger_path, budget_epsilon=20.0, delta=None)
    [entry] = ledger.entries()
    assert (entry.status, entry.steps, entry.planned_steps) == (status, steps, 8)
    from lungmae_core.privacy import epsilon_for

    # Killed while training: the full planned round is counted, at least what any released weights saw.
    assert ledger.epsilon_spent() == pytest.approx(epsilon_for([(1.0, 0.25, steps)], ledger.delta))
