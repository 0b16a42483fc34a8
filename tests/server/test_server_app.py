"""The whole schedule through the ServerApp on an in-process grid with real ClientApps and prepared sites.

Covers a site that cannot serve (no cache), bad updates (NaN, wrong shape, huge norm) rejected by name,
a site that crashes mid-round, a round with no valid update (skipped, model kept), linear probing with
int8 updates, and kill-and-resume of the server.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.client_app import make_client_app
from server.checkpoints import CheckpointStore
from server.federation_config import federation_from_mapping
from server.server_app import make_server_app
from tests.federated_helpers import InProcessGrid, ServerKilled, record_arrays, replace_first_array, with_nan

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _cfg(run_dir: Path, **extra: object) -> object:
    mapping = {"model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
               "phases": {"pretrain": {"rounds": 2, "local-epochs": 1, "lr": 1e-3, "min-sites": 1},
                          "finetune": {"rounds": 2, "local-epochs": 1, "lr": 1e-3, "min-sites": 1}},
               "run-dir": str(run_dir), "round-timeout-s": 5, "update-checks": {"max-norm": 1e3}}
    mapping.update(extra)
    return federation_from_mapping(mapping, source="test")


def _main(cfg: object, grid: InProcessGrid) -> None:
    app = make_server_app(cfg)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app._main(grid, ctx) if hasattr(app, "_main") else app(grid, ctx)  # noqa: SLF001


def _run(cfg: object, grid: InProcessGrid) -> None:
    from server.runner import FederationRunner

    FederationRunner(cfg, grid).run()


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tamper_plan(plan: dict[tuple[int, int], str]):
    """Replace the arrays of (server round, node) train replies with a bad update, or crash the site."""
    def tamper(node: int, reply: Message) -> Message:
        if reply.has_error() or "arrays" not in reply.content.array_records:
            return reply
        rnd = None
        # the message config travels with the instruction; the round is in the reply's metrics only via us:
        rnd = tamper.round_of.get(node)
        what = plan.get((rnd, node))
        if what == "nan":
            reply.content["arrays"] = replace_first_array(reply.content["arrays"], with_nan)
        elif what == "shape":
            reply.content["arrays"] = replace_first_array(reply.content["arrays"],
                                                          lambda v: np.zeros((3,) + v.shape, v.dtype))
        elif what == "norm":
            reply.content["arrays"] = replace_first_array(reply.content["arrays"],
                                                          lambda v: np.full(v.shape, 1e4, v.dtype))
        elif what == "crash":
            raise RuntimeError("site process crashed")
        return reply
    tamper.round_of = {}
    return tamper


class RoundTrackingGrid(InProcessGrid):
    """Remembers the server round of the last instruction per node (so tamper plans can target rounds)."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train" and self.tamper is not None:
                self.tamper.round_of[m.metadata.dst_node_id] = int(m.content["config"]["server-round"])
        return super().send_and_receive(messages, timeout=timeout)


def test_whole_schedule_with_failures_and_bad_updates(sites: list[Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run")
    tamper = _tamper_plan({(1, 101): "nan", (2, 102): "shape", (3, 101): "norm", (3, 102): "crash"})
    grid = RoundTrackingGrid(make_client_app(sites), [{"partition-id": i} for i in range(3)], tamper=tamper)
    _run(cfg, grid)
    lines = _lines(tmp_path / "run")
    assert [(x["round"], x["phase"]) for x in lines] == [(1, "pretrain"), (2, "pretrain"), (3, "finetune"),
                                                         (4, "finetune")]
    checks = [[(r["site"], r["check"]) for r in x["rejected_updates"]] for x in lines]
    assert checks == [[("site0", "finite")], [("site1", "shapes")], [("site0", "norm")], []]
    assert lines[2]["failures"][0]["site"] == "site1" and "crashed" in lines[2]["failures"][0]["reason"]
    assert [x["skipped"] for x in lines] == [False, False, True, False]  # round 3: no valid update left
    assert all("site-broken" not in x["participation"]["sampled"] for x in lines)
    assert lines[0]["train"]["sites"].keys() == {"site1"} and lines[0]["bytes"]["up"] > 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["status"] == "completed" and "site-broken" in summary["sites"]["node-103"]["error"]
    final = summary["final"]
    assert set(final["sites"]) == {"site0", "site1"}
    for key in ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc"):
        assert key in final["pooled"]
    assert np.asarray(final["pooled"]["confusion_matrix"]).sum() == sum(
        s["num_examples"] for s in final["sites"].values())
    assert summary["counters"]["rejected"]["site0"] == {"finite": 1, "norm": 1}
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert manifest["participating_sites"] == ["site0", "site1"] and len(manifest["rounds"]) == 4
    assert manifest["pooling"] == "lung"
    # nothing about patient data or site paths in what the server wrote
    text = (tmp_path / "run" / "metrics.jsonl").read_text() + json.dumps(summary)
    assert str(sites[0].parent) not in text and "no-cache" not in text


def test_skipped_round_keeps_the_model(sites: list[Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", phases={"pretrain": {"rounds": 1, "min-sites": 2}, "finetune": {"rounds": 0}})
    tamper = _tamper_plan({(1, 101): "nan"})
    grid = RoundTrackingGrid(make_client_app(sites[:2]), [{"partition-id": i} for i in range(2)], tamper=tamper)
    _run(cfg, grid)
    line = _lines(tmp_path / "run")[0]
    assert line["skipped"] and "fewer than min-sites 2" in line["note"]
    from lungmae_core.config import model_config
    from lungmae_core.model import build_mae

    initial = build_mae(model_config("tiny", img_size=32, depth=2, decoder_depth=1), seed=0).state_dict()
    kept = CheckpointStore(tmp_path / "run").load_latest().weights
    assert all(torch.equal(kept[k], initial[k]) for k in initial)


def test_linear_probe_sends_only_the_head_in_int8(sites: list[Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", phases={"pretrain": {"rounds": 0}, "finetune": {"rounds": 1, "mode": "linear-probe"}},
               compression="int8")
    seen: list[list[str]] = []

    def spy(node: int, reply: Message) -> Message:
        if "arrays" in reply.content.array_records:
            seen.append(sorted(record_arrays(reply.content["arrays"], deflate=True)))
        return reply
    grid = InProcessGrid(make_client_app(sites[:2]), [{"partition-id": i} for i in range(2)], tamper=spy)
    _run(cfg, grid)
    assert seen and all(not any(k.startswith("encoder.") for k in keys) for keys in seen)
    assert "head.weight#int8-scale" in seen[0]
    line = _lines(tmp_path / "run")[0]
    assert not line["skipped"] and line["bytes"]["up"] < line["bytes"]["down"] / 50


def test_kill_and_resume(sites: list[Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run")
    # exchanges: query, r1 train, r1 eval, r2 train, r2 eval, (hand-off) r3 train ... -> die in round 3's evaluate
    grid = InProcessGrid(make_client_app(sites[:2]), [{"partition-id": i} for i in range(2)], kill_after=7)
    with pytest.raises(ServerKilled):
        _run(cfg, grid)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["server_round"] == 2  # round 3 was in flight: at most one round lost
    # the restarted server: node 102 reconnects 1.5 s after node 101 (as after a SuperLink restart); the
    # resumed round waits for the site it knew instead of going on with the first site back
    grid2 = InProcessGrid(make_client_app(sites[:2]), [{"partition-id": i} for i in range(2)], late={102: 1.5})
    _run(cfg, grid2)
    lines = _lines(tmp_path / "run")
    assert [(x["round"], x["phase"]) for x in lines] == [(1, "pretrain"), (2, "pretrain"), (3, "finetune"),
                                                         (4, "finetune")]
    assert lines[2]["participation"]["sampled"] == lines[0]["participation"]["sampled"]
    assert len(lines[2]["participation"]["sampled"]) == 2, lines[2]["participation"]
    train_rounds = sorted({int(m.content["config"]["server-round"]) for m in grid2.sent
                           if m.metadata.message_type == "train" and m.content["config"]["phase"] != "cross-site"})
    assert train_rounds == [3, 4]
    audit = [json.loads(x)["event"] for x in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert "run-resumed" in audit and audit[-1] == "run-finished"
    with pytest.raises(Exception, match="started with another federation config"):
        _run(dataclasses.replace(cfg, seed=5), InProcessGrid(make_client_app(sites[:2]), [{"partition-id": 0}]))


def test_server_app_main_runs_from_run_config(sites: list[Path], tmp_path: Path) -> None:
    """The deployed path: `app` reads federation-config + overrides from context.run_config."""
    import yaml

    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump({"model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2,
                                                                           "decoder-depth": 1}},
                                   "phases": {"pretrain": {"rounds": 1}, "finetune": {"rounds": 1}},
                                   "round-timeout-s": 5}))
    from server.server_app import app

    grid = InProcessGrid(make_client_app(sites[:2]), [{"partition-id": i} for i in range(2)])
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"federation-config": str(fed), "run-dir": str(tmp_path / "r"), "pretrain-rounds": -1,
                              "finetune-rounds": 1})
    app(grid, ctx)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["status"] == "completed"
