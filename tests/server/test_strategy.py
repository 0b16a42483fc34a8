"""PhaseStrategy and the site registry on an in-process grid with small hand-written ClientApps."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lungmae_core.contract import QueryReply, RoundConfig, TrainReply
from lungmae_core.metrics import pooled_from_confusion
from lungmae_core.wire import pack_state
from server.sites import InsufficientSitesError, SiteRegistry
from server.strategy import PhaseStrategy
from tests.federated_helpers import InProcessGrid, bundle_record, record_arrays

GLOBAL = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
# node 101: labelled site; 102: unlabelled-only site; 103: crashes on query
COUNTS = {0: (0, 4, 2, 2), 1: (6, 0, 0, 0)}
CFG = RoundConfig(phase="pretrain", server_round=1, model_name="tiny", model_config={"name": "tiny"},
                  compression="fp32", phase_rounds=3)


def _app(step: float = 0.1) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        if pid not in COUNTS:
            raise RuntimeError("cache missing")
        unl, tr, va, te = COUNTS[pid]
        q = QueryReply(num_unlabelled=unl, num_labelled_train=tr, num_labelled_val=va, num_labelled_test=te,
                       dp_enabled=False, epsilon=0.0, epsilon_budget=0.0, has_gpu=False)
        return Message(RecordDict({"metrics": MetricRecord(q.encode()),
                                   "site": ConfigRecord({"site-name": f"s{pid}"})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = context.node_config["partition-id"]
        cfg = RoundConfig.decode(dict(msg.content["config"]))
        delta = {k: torch.full_like(v, step * (pid + 1)) for k, v in GLOBAL.items()}
        packed = pack_state(delta, cfg.compression)
        m = TrainReply(server_round=cfg.server_round, num_examples=1 + pid, epsilon=0.0, train_seconds=0.1,
                       update_bytes=0, loss=1.0 + pid)
        return Message(RecordDict({"arrays": bundle_record(packed), "metrics": MetricRecord(m.encode())}),
                       reply_to=msg)
    return app


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _grid(n: int = 3) -> InProcessGrid:
    return InProcessGrid(_app(), [{"partition-id": i} for i in range(n)])


def _registry(grid: InProcessGrid, names: dict[int, str] | None = None) -> SiteRegistry:
    sites = SiteRegistry(names)
    sites.query(grid, phase="pretrain", kind="train", min_sites=1, timeout_s=5, config=CFG.encode())
    return sites


def test_query_marks_failed_sites_and_phase_eligibility() -> None:
    grid = _grid()
    sites = _registry(grid)
    assert [s.name for s in sites.values()] == ["s0", "s1", "node-103"]
    assert "cache missing" in sites[103].error and not sites[101].verified
    assert [s.node_id for s in sites.values() if s.can_serve("finetune", "train")] == [101]
    assert [s.node_id for s in sites.values() if s.can_serve("pretrain", "train")] == [101, 102]
    with pytest.raises(InsufficientSitesError, match=r"only 1 of 3 connected sites can serve it and min-sites is 2"):
        sites.query(grid, phase="finetune", kind="train", min_sites=2, timeout_s=0.1, poll_s=0.05,
                    config=CFG.encode())


def test_names_come_from_the_federation_mapping_not_from_the_reply() -> None:
    """Node 102 claims to be 's0'; with a mapping it is what the mapping says; unmapped nodes take no part."""
    app = _app()
    grid = InProcessGrid(app, [{"partition-id": 0}, {"partition-id": 0}, {"partition-id": 1}])
    sites = _registry(grid, {101: "hospital-a", 102: "hospital-b"})
    assert [(s.name, s.verified) for s in sites.values()] == [("hospital-a", True), ("hospital-b", True),
                                                               ("node-103", False)]
    assert "not in federation.yaml sites" in sites[103].error and not sites[103].can_serve("pretrain", "train")
    claimed = _registry(InProcessGrid(app, [{"partition-id": 0}, {"partition-id": 0}]))
    assert [s.name for s in claimed.values()] == ["s0", "s0#102"]  # a claimed name cannot be taken twice


def test_a_site_that_never_comes_back_costs_one_grace_period_once(caplog: pytest.LogCaptureFixture) -> None:
    """After a restart the registry waits for the sites it knew, but only up to the grace and only once."""
    grid = _grid(2)
    sites = SiteRegistry()
    sites.await_sites({"s0", "gone"}, grace_s=0.4)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="server.sites"):
        sites.query(grid, phase="pretrain", kind="train", min_sites=1, timeout_s=5, poll_s=0.05,
                    config=CFG.encode())
    assert 0.4 <= time.monotonic() - t0 < 3
    assert "going on without ['gone']" in caplog.text
    t0 = time.monotonic()
    sites.query(grid, phase="pretrain", kind="train", min_sites=1, timeout_s=5, poll_s=0.05, config=CFG.encode())
    assert time.monotonic() - t0 < 0.3  # the wait applied to one query only


def test_a_site_that_reconnects_during_the_grace_is_asked_once_with_the_grace_left() -> None:
    """The regression of a real run: the awaited site's ClientApp takes seconds to answer its first query;
    asked with the long-past min-sites deadline (1 s) it never answered in time, and was asked again every
    poll, each query queued behind the last, until the grace ran out."""

    class SlowLateGrid(InProcessGrid):
        def __init__(self) -> None:
            super().__init__(_app(), [{"partition-id": 0}, {"partition-id": 1}], late={102: 0.5})
            self.timeouts: list[float] = []

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if any(m.metadata.dst_node_id == 102 for m in messages):
                self.timeouts.append(float(timeout))
                if timeout < 2.0:  # node 102 needs 2 s to start its ClientApp: no reply within less
                    for m in messages:
                        m.metadata.__dict__["_message_id"] = f"late-{len(self.timeouts)}"
                    return []
            return super().send_and_receive(messages, timeout=timeout)

    grid = SlowLateGrid()
    sites = SiteRegistry()
    sites.await_sites({"s0", "s1"}, grace_s=5.0)
    sites.query(grid, phase="pretrain", kind="train", min_sites=1, timeout_s=0.1, poll_s=0.05, config=CFG.encode())
    assert sorted(s.name for s in sites.values()) == ["s0", "s1"]
    assert len(grid.timeouts) == 1 and 2.0 <= grid.timeouts[0] <= 5.0, grid.timeouts


@pytest.mark.parametrize("method, expected", [("fedavg", (0.1 * 1 + 0.2 * 2) / 3), ("median", 0.15)])
def test_round_aggregates_able_sites_only(method: str, expected: float) -> None:
    grid = _grid()
    sites = _registry(grid)
    strategy = PhaseStrategy(CFG, sites, method=method, max_norm=10.0, max_site_share=1.0)
    new, report = strategy.train_round(grid, GLOBAL, CFG, timeout=5)
    assert sorted(m.metadata.dst_node_id for m in grid.sent[-2:]) == [101, 102]
    sent = grid.sent[-1]
    assert sent.content["config"]["phase"] == "pretrain"
    assert record_arrays(sent.content["arrays"])["w"].dtype == np.float32
    assert np.allclose(new["w"].numpy(), expected, atol=1e-6) and new["w"].dtype == torch.float32
    assert report.replied == ["s0", "s1"] and report.bytes_up > 0 and report.aggregated["num_examples"] == 3
    assert report.aggregated["loss"] == pytest.approx((1.0 * 1 + 2.0 * 2) / 3)


def test_the_share_cap_limits_a_site_with_more_examples() -> None:
    grid = _grid(2)
    strategy = PhaseStrategy(CFG, _registry(grid), max_norm=10.0, max_site_share=0.5)
    new, report = strategy.train_round(grid, GLOBAL, CFG, timeout=5)
    assert np.allclose(new["w"].numpy(), 0.5 * 0.1 + 0.5 * 0.2)  # 1 vs 2 examples: capped to equal shares
    assert report.aggregated["max_site_share"] == 0.5


def test_central_dp_clips_each_update_as_it_is_folded_in() -> None:
    """Site updates of norm 0.1*sqrt(8) and 0.2*sqrt(8) clipped to 0.05 each, equal weights, no noise."""
    grid = _grid(2)
    strategy = PhaseStrategy(CFG, _registry(grid), max_norm=10.0, max_site_share=0.5, central_dp=(0.0, 0.05, 1e-5))
    new, report = strategy.train_round(grid, GLOBAL, CFG, timeout=5)
    per_value = 0.05 / np.sqrt(8)  # both clipped to norm 0.05 over 8 equal values
    assert np.allclose(new["w"].numpy(), per_value, atol=1e-6) and np.allclose(new["b"].numpy(), per_value, atol=1e-6)
    assert report.aggregated["central_clipped"] == 2


def test_missing_reply_counts_as_failed_and_round_is_skipped() -> None:
    grid = _grid(2)
    sites = _registry(grid)
    grid.tamper = lambda node, reply: None if node == 102 else reply
    new, report = PhaseStrategy(CFG, sites, min_sites=2).train_round(grid, GLOBAL, CFG, timeout=5)
    assert new is None
    assert report.failed == [{"site": "s1", "reason": "no reply within round-timeout-s"}]
    assert report.skipped and "1 valid updates, fewer than min-sites 2" in report.note


def test_fraction_sampling_is_deterministic_and_respects_min_sites() -> None:
    grid = _grid(2)
    sites = _registry(grid)
    picks = []
    for _ in range(2):
        before = len(grid.sent)
        PhaseStrategy(CFG, sites, fraction=0.1, min_sites=1, seed=3).train_round(grid, GLOBAL, CFG.with_round(4),
                                                                                 timeout=5)
        picks.append([m.metadata.dst_node_id for m in grid.sent[before:]])
    assert picks[0] == picks[1] and len(picks[0]) == 1
    finetune = RoundConfig(**{**CFG.__dict__, "phase": "finetune"})
    new, report = PhaseStrategy(finetune, sites, min_sites=2).train_round(grid, GLOBAL, finetune, timeout=5)
    assert new is None and report.skipped and "only 1 sites can train finetune; min-sites is 2" in report.note


def test_pooled_from_confusion() -> None:
    cm = np.array([[2, 0], [1, 1]])
    out = pooled_from_confusion(cm)
    assert out["accuracy"] == pytest.approx(0.75) and out["balanced_accuracy"] == pytest.approx(0.75)
    f1_0, f1_1 = 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5
    assert out["weighted_f1"] == pytest.approx((2 * f1_0 + 2 * f1_1) / 4)
    assert pooled_from_confusion(np.array([[3, 0], [0, 0]]))["balanced_accuracy"] is None  # one class only
