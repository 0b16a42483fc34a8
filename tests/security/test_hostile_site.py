"""The coordinator against a faulty or hostile site: constructed replies, each dropped by the check it fails.

A hand-written ClientApp plays two honest sites and one hostile site (node 103) whose train reply is
tampered with; every case asserts the specific drop (site, check, reason), that it reached Prometheus and
the audit log, and that the round went on with the honest sites. The last test runs the real ClientApps
with one site sending garbage in every round: the run finishes and metrics.json shows the rejections.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lungmae_core.bundle import DEFLATED
from lungmae_core.contract import EvalReply, QueryReply, RoundConfig, TrainReply
from lungmae_core.wire import pack_state
from server.sites import SiteRegistry
from server.strategy import PhaseStrategy
from server.telemetry import Telemetry
from tests.federated_helpers import InProcessGrid, bundle_record, record_arrays

pytestmark = pytest.mark.usefixtures("flower_task_identity")

GLOBAL = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
CFG = RoundConfig(phase="finetune", server_round=3, model_name="tiny", model_config={"name": "tiny"},
                  compression="fp32", phase_rounds=5, phase_round=3)
HONEST_STEP = 0.1
DECLARED = {0: 5, 1: 5, 2: 5}  # labelled training scans each node declares in its query
DP = {"enabled": False}  # what every node declares about DP in its query


def _app(step: dict[int, float] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context) -> Message:
        n = DECLARED[context.node_config["partition-id"]]
        q = QueryReply(num_unlabelled=0, num_labelled_train=n, num_labelled_val=12, num_labelled_test=12,
                       dp_enabled=DP["enabled"], epsilon=0.0, epsilon_budget=0.0, has_gpu=False)
        return Message(RecordDict({"metrics": MetricRecord(q.encode()),
                                   "site": ConfigRecord({"site-name": f"site{context.node_config['partition-id']}"})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        cfg = RoundConfig.decode(dict(msg.content["config"]))
        value = (step or {}).get(pid, HONEST_STEP)
        packed = pack_state({k: torch.full_like(v, value) for k, v in GLOBAL.items()}, cfg.compression)
        m = TrainReply(server_round=cfg.server_round, num_examples=5, epsilon=0.0, train_seconds=0.1,
                       update_bytes=0, loss=0.5, accuracy=0.5)
        arrays = bundle_record(packed, deflate=cfg.compression in DEFLATED)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(m.encode())}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        cfg = RoundConfig.decode(dict(msg.content["config"]))
        cm = [3, 0, 0, 0, 0, 3, 0, 0, 0, 0, 3, 0, 0, 0, 0, 3]
        m = EvalReply(server_round=cfg.server_round, num_examples=12, epsilon=0.0, classes_present=4,
                      confusion_matrix=tuple(cm), loss=0.3, accuracy=1.0, balanced_accuracy=1.0, weighted_f1=1.0)
        return Message(RecordDict({"metrics": MetricRecord(m.encode())}), reply_to=msg)
    return app


def _set(key: str, value):
    def change(reply: Message) -> Message:
        reply.content["metrics"][key] = value
        return reply
    return change


def _array(fn):
    def change(reply: Message) -> Message:
        packed = dict(record_arrays(reply.content["arrays"]))
        packed["w"] = fn(np.array(packed["w"]))
        reply.content["arrays"] = bundle_record(packed)
        return reply
    return change


def _per_tensor(reply: Message) -> Message:
    """The arrays one by one, not in a bundle (the format before contract version 4)."""
    packed = record_arrays(reply.content["arrays"])
    reply.content["arrays"] = ArrayRecord(array_dict={k: Array(np.array(v)) for k, v in packed.items()})
    return reply


def _raw_bundle(layout: bytes | None = None, extra_payload: int = 0):
    def change(reply: Message) -> Message:
        arrays = reply.content["arrays"]
        raw_layout = arrays["layout"].numpy() if layout is None else np.frombuffer(layout, np.uint8).copy()
        payload = np.concatenate([arrays["payload"].numpy(), np.zeros(extra_payload, np.uint8)])
        reply.content["arrays"] = ArrayRecord(array_dict={"layout": Array(raw_layout), "payload": Array(payload)})
        return reply
    return change


def _extra_record(reply: Message) -> Message:
    reply.content["extra"] = MetricRecord({"x": 1})
    return reply


def _oversize(reply: Message) -> Message:
    reply.content["arrays"]["padding"] = Array(np.zeros(1_000_000, np.float32))  # 4 MB beside a 80-byte model
    return reply


def _replayed(reply: Message) -> Message:
    reply.content["metrics"]["server_round"] = CFG.server_round - 1
    return reply


HOSTILE = [
    ("huge count", _set("num_examples", 10**15), "contract", "'num_examples' must be in [1, 10000000]"),
    ("NaN count", _set("num_examples", float("nan")), "contract", "'num_examples' must be an integer"),
    ("negative count", _set("num_examples", -5), "contract", "'num_examples' must be in [1, 10000000]"),
    ("zero count", _set("num_examples", 0), "contract", "'num_examples' must be in [1, 10000000]"),
    ("count above the declared one", _set("num_examples", 6), "count", "num_examples 6 exceeds the 5 scans"),
    ("accuracy above 1", _set("accuracy", 1.5), "contract", "'accuracy' must be in [0, 1]; got 1.5"),
    ("NaN loss", _set("loss", float("nan")), "contract", "'loss' must be finite"),
    ("NaN epsilon", _set("epsilon", float("nan")), "contract", "'epsilon' must be finite"),
    ("negative epsilon", _set("epsilon", -1.0), "contract", "'epsilon' must be in [0, 1e+06]"),
    ("metric as text", _set("train_seconds", [1.0, 2.0]), "contract", "'train_seconds' must be a number"),
    ("wrong contract version", _set("contract_version", 1), "contract", "contract version 1 but this side"),
    ("extra record", _extra_record, "contract", "expected MetricRecord 'metrics'"),
    ("wrong shape", _array(lambda a: np.zeros((5, 4), a.dtype)), "shapes", "w (5, 4) != (4, 4)"),
    ("wrong dtype", _array(lambda a: a.astype(np.float64)), "dtypes", "w float64 != float32"),
    ("NaN weights", _array(lambda a: np.full_like(a, np.nan)), "finite", "non-finite values in 'w'"),
    ("huge norm", _array(lambda a: np.full_like(a, 1e6)), "norm", "exceeds the bound"),
    ("oversize payload", _oversize, "size", "exceeds the bound of"),
    ("one array per tensor", _per_tensor, "contract", "exactly the arrays 'layout' and 'payload'"),
    ("payload longer than its layout", _raw_bundle(extra_payload=8), "contract", "but the payload has"),
    ("layout declaring more than arrived", _raw_bundle(b'[["w",[4,4000],"float32"]]'), "contract",
     "adds up to 64000 bytes"),
    ("layout with a pickled dtype", _raw_bundle(b'[["w",[4,4],"object"]]'), "contract", "is not one of"),
    ("layout that is not JSON", _raw_bundle(b"\xff\xfe"), "contract", "not UTF-8 JSON"),
    ("layout naming a tensor twice", _raw_bundle(b'[["w",[4,4],"float32"],["w",[4,4],"float32"]]'), "contract",
     "repeated name"),
    ("replayed round", _replayed, "replay", "the reply is for round 2, not 3"),
]


def _run_round(tamper, *, require_dp: bool = False, step: dict[int, float] | None = None, share: float = 0.5,
               cfg: RoundConfig = CFG):
    grid = InProcessGrid(_app(step), [{"partition-id": i} for i in range(3)],
                         tamper=(lambda node, reply: tamper(reply) if node == 103 and reply.content.array_records
                                 else reply) if tamper else None)
    sites = SiteRegistry()
    sites.query(grid, phase="finetune", kind="train", min_sites=3, timeout_s=5, config=cfg.encode())
    strategy = PhaseStrategy(cfg, sites, max_norm=100.0, max_site_share=share, require_dp=require_dp)
    return strategy.train_round(grid, GLOBAL, cfg, timeout=5)


def _deflate_bomb(reply: Message) -> Message:
    """16 MB of zeros in 16 KB of deflate stream, under a layout that declares them (the model is 80 bytes)."""
    layout = b'[["w",[4,4000000],"int8"],["w#int8-scale",[15625],"float32"],["b",[4],"int8"],' \
             b'["b#int8-scale",[1],"float32"]]'
    payload = zlib.compress(bytes(16_000_000 + 62_504 + 8 + 8), 9)
    reply.content["arrays"] = ArrayRecord(array_dict={"layout": Array(np.frombuffer(layout, np.uint8).copy()),
                                                      "payload": Array(np.frombuffer(payload, np.uint8).copy())})
    return reply


def test_an_int8_run_refuses_a_deflate_bomb_before_inflating_it() -> None:
    """int8 updates travel deflated; a layout larger than the expected update is refused before inflating."""
    cfg = dataclasses.replace(CFG, compression="int8")
    new, report = _run_round(_deflate_bomb, cfg=cfg)
    assert [(r.site, r.check) for r in report.rejected] == [("site2", "contract")]
    assert "over the 40 expected" in report.rejected[0].reason
    assert sorted(report.sites) == ["site0", "site1"] and np.allclose(new["w"].numpy(), HONEST_STEP, atol=1e-3)

    def plain(reply: Message) -> Message:  # the same update, not deflated: not how an int8 update travels
        reply.content["arrays"] = bundle_record(record_arrays(reply.content["arrays"], deflate=True))
        return reply
    _, report = _run_round(plain, cfg=cfg)
    assert [(r.site, r.check) for r in report.rejected] == [("site2", "contract")]


@pytest.mark.parametrize("label, tamper, check, reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_reply_is_dropped_and_the_round_goes_on(tmp_path: Path, label: str, tamper, check: str,
                                                          reason: str) -> None:
    new, report = _run_round(tamper)
    assert [(r.site, r.check) for r in report.rejected] == [("site2", check)], report.rejected
    assert reason in report.rejected[0].reason
    assert sorted(report.sites) == ["site0", "site1"]  # the honest sites' updates were aggregated
    assert np.allclose(new["w"].numpy(), HONEST_STEP)
    # the drop is counted in Prometheus and recorded in the audit log (site, check: no values)
    telemetry = Telemetry(tmp_path / "audit.jsonl", None)
    record = {"phase": "finetune", "round": 3, "rejected_updates": [r.__dict__ for r in report.rejected],
              "participation": {"sampled": report.sampled, "replied": report.replied}, "failures": report.failed,
              "bytes": {"down": 0, "up": report.bytes_up}, "train": {"aggregated": report.aggregated,
                                                                     "sites": report.sites},
              "evaluate": {"aggregated": {}, "sites": {}}}
    telemetry.round_finished(record, 0.1)
    assert f'lungmae_updates_rejected_total{{reason="{check}"}} 1.0' in telemetry.prom.render()
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["site"], e["check"]) for e in events if e["event"] == "update-rejected"] == [("site2", check)]
    telemetry.close()


def test_a_reply_to_another_message_and_a_duplicate_reply_are_dropped() -> None:
    class Replaying(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if messages and messages[0].metadata.message_type == "train":
                duplicate = copy.deepcopy(replies[0])  # the same answer twice
                stray = copy.deepcopy(replies[1])
                stray.metadata.__dict__["_reply_to_message_id"] = "m-from-an-old-round"
                replies += [duplicate, stray]
            return replies

    grid = Replaying(_app(), [{"partition-id": i} for i in range(2)])
    sites = SiteRegistry()
    sites.query(grid, phase="finetune", kind="train", min_sites=2, timeout_s=5, config=CFG.encode())
    new, report = PhaseStrategy(CFG, sites, max_norm=100.0).train_round(grid, GLOBAL, CFG, timeout=5)
    assert [r.check for r in report.rejected] == ["replay", "replay"] and sorted(report.sites) == ["site0", "site1"]
    assert np.allclose(new["w"].numpy(), HONEST_STEP)


def test_a_reply_from_another_node_is_an_identity_drop() -> None:
    class Impersonating(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if messages and messages[0].metadata.message_type == "train":
                replies[0].metadata.__dict__["_src_node_id"] = 102  # node 102 answers in node 101's name
            return replies

    grid = Impersonating(_app(), [{"partition-id": i} for i in range(2)])
    sites = SiteRegistry()
    sites.query(grid, phase="finetune", kind="train", min_sites=2, timeout_s=5, config=CFG.encode())
    new, report = PhaseStrategy(CFG, sites, max_norm=100.0).train_round(grid, GLOBAL, CFG, timeout=5)
    assert [(r.site, r.check) for r in report.rejected] == [("site0", "identity")]
    assert list(report.sites) == ["site1"] and np.allclose(new["w"].numpy(), HONEST_STEP)


def test_epsilon_zero_under_require_dp_is_a_privacy_drop(monkeypatch) -> None:
    """The sites say they run DP but report epsilon 0 after training: all dropped, the model is kept."""
    monkeypatch.setitem(DP, "enabled", True)
    new, report = _run_round(None, require_dp=True)
    assert {(r.site, r.check) for r in report.rejected} == {(f"site{i}", "privacy") for i in range(3)}
    assert new is None and report.skipped


def test_a_site_claiming_1e7_examples_moves_the_model_by_at_most_its_capped_share(monkeypatch) -> None:
    """site2 declared 1e7 scans and claims them all; its update is 100x the honest ones'. With
    max-site-share 0.5 it moves the global model by exactly half of its update, no more."""
    def claim(reply: Message) -> Message:
        reply.content["metrics"]["num_examples"] = 10_000_000
        return reply

    monkeypatch.setitem(DECLARED, 2, 10_000_000)
    new, report = _run_round(claim, step={2: 10.0}, share=0.5)
    assert not report.rejected and report.aggregated["max_site_share"] == 0.5
    assert np.allclose(new["w"].numpy(), 0.5 * 10.0 + 0.5 * HONEST_STEP)
    uncapped, _ = _run_round(claim, step={2: 10.0}, share=1.0)
    assert float(uncapped["w"][0, 0]) > 9.99  # without the cap the claimed count decides the model


def test_a_1e15_count_moves_the_model_not_at_all() -> None:
    new, report = _run_round(_set("num_examples", 10**15), step={2: 100.0})
    assert [r.check for r in report.rejected] == ["contract"]
    assert np.allclose(new["w"].numpy(), HONEST_STEP)


@pytest.mark.parametrize("change, reason", [
    ({"confusion_matrix": [1, 2, 3]}, "'confusion_matrix' has 3 entries; expected 0 or 16"),
    ({"confusion_matrix": [12] + [0] * 14 + [-1]}, "must hold integers in [0, 10000000]"),
    ({"confusion_matrix": [0.5] * 16}, "must hold integers"),
    ({"balanced_accuracy": -0.1}, "'balanced_accuracy' must be in [0, 1]"),
])
def test_bad_evaluation_metrics_are_dropped(change: dict, reason: str) -> None:
    def tamper(node: int, reply: Message) -> Message:
        if node == 103 and not reply.content.config_records:
            for k, v in change.items():
                reply.content["metrics"][k] = v
        return reply

    grid = InProcessGrid(_app(), [{"partition-id": i} for i in range(3)], tamper=tamper)
    sites = SiteRegistry()
    sites.query(grid, phase="finetune", kind="train", min_sites=3, timeout_s=5, config=CFG.encode())
    report = PhaseStrategy(CFG, sites).evaluate(grid, GLOBAL, CFG, timeout=5)
    assert [(r.site, r.check) for r in report.rejected] == [("site2", "contract")]
    assert reason in report.rejected[0].reason
    assert report.aggregated["num_examples"] == 24 and report.aggregated["balanced_accuracy"] == 1.0


def test_a_run_with_one_site_sending_garbage_every_round_finishes(sites: list[Path], tmp_path: Path) -> None:
    """Real ClientApps; node 102's every train and evaluate reply is garbage. The run completes with site0
    and metrics.json, the audit log and the report data show each rejection."""
    from client.client_app import make_client_app
    from server.audit import read_audit_log
    from server.federation_config import federation_from_mapping
    from server.report.data import load_run
    from server.runner import FederationRunner

    def garbage(node: int, reply: Message) -> Message:
        if node == 102 and not reply.has_error() and not reply.content.config_records:  # train and evaluate
            for key in [k for k in reply.content["metrics"].keys() if k != "contract_version"]:
                reply.content["metrics"][key] = float("nan")
        return reply

    cfg = federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": 1}, "finetune": {"rounds": 1}}, "run-dir": str(tmp_path / "run"),
        "round-timeout-s": 5}, source="test")
    grid = InProcessGrid(make_client_app(sites[:2]), [{"partition-id": 0}, {"partition-id": 1}], tamper=garbage)
    summary = FederationRunner(cfg, grid).run()
    assert summary["status"] == "completed"
    rounds = [r for phase in summary["phases"].values() for r in phase]
    assert all(r["train_sites"].keys() == {"site0"} for r in rounds)
    # per round: the train reply and the val evaluation reply of site1 were dropped by the contract check
    assert summary["counters"]["rejected"] == {"site1": {"contract": 4}}
    assert [r["site"] for r in summary["final"]["rejected"]] == ["site1"]
    assert set(summary["final"]["sites"]) == {"site0"}
    events = read_audit_log(tmp_path / "run" / "audit.jsonl")
    # + the cross-site step: site1's garbage local model, and its garbage score of site0's local model
    assert sum(1 for e in events if e["event"] == "update-rejected" and e["site"] == "site1") == 7
    cross = summary["final"]["cross_site"]
    assert cross["models"] == ["global", "site0", "site1"] and "contract check" in cross["notes"]["models"]["site1"]
    assert [(c["model"], c["data_site"]) for c in cross["notes"]["cells"]] == [("site0", "site1")]
    assert cross["metrics"]["accuracy"][2] == [None, None] and cross["metrics"]["accuracy"][1][0] is not None
    run = load_run(tmp_path / "run")
    assert sum(1 for r in run.rounds for p in r.problems if p.startswith("rejected site1 (contract)")) == 4
    from server.report import render_report

    page = render_report(tmp_path / "run", reconstructions=False).read_text(encoding="utf-8")
    assert "rejected site1 (contract): train reply:" in page
