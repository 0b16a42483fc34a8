"""PhaseStrategy and query_sites on an in-process grid with small hand-written ClientApps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lungmae_core.schema import build_metrics
from lungmae_core.wire import pack_state
from server.strategy import InsufficientSitesError, PhaseStrategy, pooled_from_confusion, query_sites, state_to_arrays
from tests.federated_helpers import InProcessGrid

GLOBAL = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
# node 101: labelled site; 102: unlabelled-only site; 103: crashes on query
COUNTS = {0: (0, 4, 2, 2), 1: (6, 0, 0, 0)}


def _app(step: float = 0.1) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        if pid not in COUNTS:
            raise RuntimeError("cache missing")
        unl, tr, va, te = COUNTS[pid]
        m = build_metrics("query", "", {"num-examples": unl + tr, "num-unlabelled": unl, "num-labelled-train": tr,
                                        "num-labelled-val": va, "num-labelled-test": te, "dp-enabled": 0,
                                        "epsilon": 0.0, "epsilon-budget": 0.0, "has-gpu": 0})
        return Message(RecordDict({"metrics": MetricRecord(m), "site": ConfigRecord({"site-name": f"s{pid}"})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        delta = {k: torch.full_like(v, step * (pid + 1)) for k, v in GLOBAL.items()}
        packed = pack_state(delta, msg.content["config"]["compression"])
        m = build_metrics("train", msg.content["config"]["phase"], {
            "num-examples": 1 + pid, "train-loss": 1.0 + pid, "train-loss-lung": 0.0, "train-loss-non-lung": 0.0,
            "epsilon": 0.0, "train-seconds": 0.1, "update-bytes": 0})
        return Message(RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in packed.items()}),
                                   "metrics": MetricRecord(m)}), reply_to=msg)
    return app


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _grid(n: int = 3) -> InProcessGrid:
    return InProcessGrid(_app(), [{"partition-id": i} for i in range(n)])


def test_query_marks_failed_sites_and_phase_eligibility() -> None:
    grid = _grid()
    sites = query_sites(grid, {}, phase="pretrain", kind="train", min_sites=2, timeout_s=5)
    assert [s.name for s in sites.values()] == ["s0", "s1", "node-103"]
    assert "cache missing" in sites[103].error
    assert [n for n, s in sites.items() if s.can_serve("finetune", "train")] == [101]
    assert [n for n, s in sites.items() if s.can_serve("pretrain", "train")] == [101, 102]
    with pytest.raises(InsufficientSitesError, match=r"only 1 of 3 connected sites can serve it and min-sites is 2"):
        query_sites(grid, sites, phase="finetune", kind="train", min_sites=2, timeout_s=0.1, poll_s=0.05)


@pytest.mark.parametrize("method, expected", [("fedavg", (0.1 * 1 + 0.2 * 2) / 3), ("median", 0.15)])
def test_round_aggregates_able_sites_only(method: str, expected: float) -> None:
    grid = _grid()
    sites = query_sites(grid, {}, phase="pretrain", kind="train", min_sites=1, timeout_s=5)
    strategy = PhaseStrategy(phase="pretrain", sites=sites, method=method, compression="fp32", max_norm=10.0)
    messages = list(strategy.configure_train(1, state_to_arrays(GLOBAL), ConfigRecord({"lr": 0.1}), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 102]
    assert messages[0].content["config"]["phase"] == "pretrain" and messages[0].content["arrays"]["w"].dtype == "float32"
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    new = {k: v.numpy() for k, v in arrays.items()}
    assert np.allclose(new["w"], expected, atol=1e-6) and new["w"].dtype == np.float32
    report = strategy.last_train
    assert report.replied == ["s0", "s1"] and report.bytes_up > 0 and metrics["num-examples"] == 3
    assert metrics["train-loss"] == pytest.approx((1.0 * 1 + 2.0 * 2) / 3)


def test_missing_reply_counts_as_failed_and_round_is_skipped() -> None:
    grid = _grid(2)
    sites = query_sites(grid, {}, phase="pretrain", kind="train", min_sites=1, timeout_s=5)
    grid.tamper = lambda node, reply: None if node == 102 else reply
    strategy = PhaseStrategy(phase="pretrain", sites=sites, min_sites=2, compression="fp16")
    messages = list(strategy.configure_train(1, state_to_arrays(GLOBAL), ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert arrays is None and metrics is None
    assert strategy.last_train.failed == [{"site": "s1", "reason": "no reply within round-timeout-s"}]
    assert strategy.last_train.skipped and "1 valid updates, fewer than min-sites 2" in strategy.last_train.note


def test_fraction_sampling_is_deterministic_and_respects_min_sites() -> None:
    grid = _grid(2)
    sites = query_sites(grid, {}, phase="pretrain", kind="train", min_sites=1, timeout_s=5)
    picks = []
    for _ in range(2):
        s = PhaseStrategy(phase="pretrain", sites=sites, fraction=0.1, min_sites=1, seed=3)
        picks.append([m.metadata.dst_node_id for m in s.configure_train(4, state_to_arrays(GLOBAL), ConfigRecord(), grid)])
    assert picks[0] == picks[1] and len(picks[0]) == 1
    s = PhaseStrategy(phase="finetune", sites=sites, min_sites=2)
    assert list(s.configure_train(1, state_to_arrays(GLOBAL), ConfigRecord(), grid)) == []
    assert s.last_train.skipped and "only 1 sites can train finetune; min-sites is 2" in s.last_train.note


def test_pooled_from_confusion() -> None:
    cm = np.array([[2, 0], [1, 1]])
    out = pooled_from_confusion(cm)
    assert out["accuracy"] == pytest.approx(0.75) and out["balanced_accuracy"] == pytest.approx(0.75)
    f1_0, f1_1 = 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5
    assert out["weighted_f1"] == pytest.approx((2 * f1_0 + 2 * f1_1) / 4)
    assert pooled_from_confusion(np.zeros((3, 3)))["accuracy"] == 0.0
