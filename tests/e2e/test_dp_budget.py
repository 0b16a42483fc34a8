"""Budget exhaustion end to end: real ClientApp handlers, the real server runner, an in-process grid (no Ray).

A DP site with room for exactly two rounds trains rounds 1-2, refuses round 3 with a privacy refusal the
server logs, is not sampled again, while the other site carries the federation on; a restarted client
(a new ClientApp reading only the ledger on disk) still refuses, also after its cache was deleted and
rebuilt; with the ledger deleted it refuses DP work and names the reset command.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import make_client_app
from client.ledger import RESET_COMMAND, PrivacyLedger
from client.privacy_gate import training_patients
from client.site_config import load_site_config, write_site_config
from lungmae_core.config import to_mapping
from lungmae_core.contract import RoundConfig
from lungmae_core.model import build_mae
from lungmae_core.privacy import PRIVACY_REFUSAL_CODE, DPConfig, default_delta, epsilon_for, sample_rate_for, steps_for
from lungmae_core.wire import pack_state
from server.federation_config import federation_from_mapping
from tests.federated_helpers import InProcessGrid, bundle_record, prepared_sites

ROUNDS = 4


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _dp_site(site_yaml: Path, out_dir: Path) -> tuple[Path, float, float]:
    """A copy of ``site_yaml`` (own cache copy, own state folder) with DP on and a budget for exactly 2 pretrain
    rounds; (path, eps2, cap)."""
    site = load_site_config(site_yaml)
    shutil.copytree(site.data.cache, out_dir / "cache")
    n = training_patients(site.data.cache)  # the unit is the patient
    batch = site.training.batch_size
    round_history = (1.0, sample_rate_for(n, batch), steps_for(n, batch, epochs=1))
    delta = default_delta(n)
    eps2, eps3 = (epsilon_for([round_history] * k, delta) for k in (2, 3))
    cap = (eps2 + eps3) / 2
    privacy = DPConfig(enabled=True, epsilon=cap, noise_multiplier=1.0)  # ledger: <state-dir>/privacy-ledger.json
    site = dataclasses.replace(site.with_data(cache=out_dir / "cache", secret_file=None), privacy=privacy,
                               site=dataclasses.replace(site.site, state_dir=out_dir / "state"))
    path = write_site_config(site, out_dir / "site.yaml")
    return Path(path), eps2, cap


def test_small_budget_trains_k_rounds_then_refuses_even_after_restart(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from server.runner import FederationRunner

    caplog.set_level("WARNING", logger="server.strategy")

    site0, site1 = prepared_sites(tmp_path / "sites")
    dp_site0, eps2, cap = _dp_site(site0, tmp_path / "dp-site0")
    run_dir = tmp_path / "run"
    cfg = federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": ROUNDS, "local-epochs": 1, "lr": 1e-3, "min-sites": 1},
                   "finetune": {"rounds": 0}},
        "run-dir": str(run_dir), "round-timeout-s": 5, "update-checks": {"max-norm": 1e3}}, source="test")
    grid = InProcessGrid(make_client_app([dp_site0, site1]), [{"partition-id": 0}, {"partition-id": 1}])
    FederationRunner(cfg, grid).run()

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["phase"] == "pretrain"]
    assert [x["round"] for x in train] == list(range(1, ROUNDS + 1))
    name0 = load_site_config(dp_site0).site.name
    name1 = load_site_config(site1).site.name
    # rounds 1-2: the DP site trains and reports its growing total epsilon; the other site reports 0.0
    eps = [x["train"]["sites"][name0]["epsilon"] for x in train[:2]]
    assert 0 < eps[0] < eps[1] == pytest.approx(eps2) and eps[1] <= cap
    assert all(x["train"]["sites"][name1]["epsilon"] == 0.0 for x in train)
    # round 3: a refusal the server logs; round 4: the site is no longer sampled; the federation goes on
    refusal = [f for f in train[2]["failures"] if f["site"] == name0]
    assert refusal and refusal[0]["reason"].startswith("privacy-refusal: Unable to train pretrain round 3")
    assert name0 not in train[3]["participation"]["sampled"]
    assert any(f"site {name0} refused for privacy and is excluded from further training rounds: "
               "privacy-refusal: Unable to train pretrain round 3" in r.getMessage() for r in caplog.records)
    assert all(name1 in x["train"]["sites"] for x in train) and not any(x["skipped"] for x in train)

    ledger_path = tmp_path / "dp-site0" / "state" / "privacy-ledger.json"
    assert load_site_config(dp_site0).privacy.ledger == ledger_path
    ledger = PrivacyLedger(ledger_path, budget_epsilon=cap, delta=None)
    assert [(e.server_round, e.status) for e in ledger.entries()] == [(1, "trained"), (2, "trained")]
    assert ledger.epsilon_spent() == pytest.approx(eps2)

    # Restart: a new ClientApp has only the ledger file; it still refuses, as a clean error reply.
    state = build_mae(_tiny(), seed=0).state_dict()
    reply = make_client_app([dp_site0])(_train_message(state, server_round=ROUNDS + 1), _ctx())
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSAL_CODE
    assert reply.error.reason.startswith(f"privacy-refusal: Unable to train pretrain round {ROUNDS + 1}")
    assert f"over its budget {cap:.3f}" in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert len(ledger.entries()) == 2 and [r["server_round"] for r in ledger.refusals()] == [3, ROUNDS + 1]

    # Deleting the cache (and rebuilding it) does not give the budget back: the ledger lives in the state folder.
    cache = tmp_path / "dp-site0" / "cache"
    shutil.rmtree(cache)
    shutil.copytree(load_site_config(site0).data.cache, cache)
    reply = make_client_app([dp_site0])(_train_message(state, server_round=ROUNDS + 2), _ctx())
    assert reply.has_error() and f"over its budget {cap:.3f}" in reply.error.reason

    # Deleting the ledger: DP work is refused, and the refusal names the reset command (and no path).
    ledger_path.unlink()
    reply = make_client_app([dp_site0])(_train_message(state, server_round=ROUNDS + 3), _ctx())
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSAL_CODE
    assert "privacy ledger (privacy-ledger.json) is missing" in reply.error.reason
    assert RESET_COMMAND in reply.error.reason and str(tmp_path) not in reply.error.reason


def _tiny():
    from lungmae_core.config import model_config

    return model_config("tiny", img_size=32, depth=2, decoder_depth=1)


def _train_message(state: dict[str, torch.Tensor], server_round: int) -> Message:
    config = RoundConfig(phase="pretrain", server_round=server_round, model_name="tiny",
                         model_config=to_mapping(_tiny())).encode()
    arrays = bundle_record(pack_state(state, "fp16"))
    return Message(RecordDict({"config": ConfigRecord(config), "arrays": arrays}), dst_node_id=7,
                   message_type="train")


def _ctx() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_central_dp_reports_its_epsilon_per_round(tmp_path: Path) -> None:
    from lungmae_core.privacy import central_dp_epsilon
    from server.runner import FederationRunner

    sites = prepared_sites(tmp_path / "sites")
    run_dir = tmp_path / "run"
    cfg = federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": 2, "local-epochs": 1, "lr": 1e-3, "min-sites": 1},
                   "finetune": {"rounds": 0}},
        "privacy": {"central-dp": True, "central-dp-noise-multiplier": 2.0, "central-dp-clip": 0.5},
        "run-dir": str(run_dir), "round-timeout-s": 5, "update-checks": {"max-norm": 1e3}}, source="test")
    FederationRunner(cfg, InProcessGrid(make_client_app(sites), [{"partition-id": 0}, {"partition-id": 1}])).run()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["train"]["aggregated"]["central_epsilon"] for x in lines] == pytest.approx(
        [central_dp_epsilon(2.0, r, 1e-3) for r in (1, 2)])
    with pytest.raises(Exception, match="privacy central-dp needs strategy fedavg or fedprox"):
        federation_from_mapping({"privacy": {"central-dp": True}, "strategy": {"name": "median"}}, source="test")
