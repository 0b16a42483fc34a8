"""ClientApp handlers with constructed messages on a real prepared synthetic site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import make_client_app
from lungmae_core.config import model_config, to_mapping
from lungmae_core.contract import EvalReply, QueryReply, RoundConfig, TrainReply
from lungmae_core.heads import ILDClassifier
from lungmae_core.model import build_mae
from lungmae_core.wire import pack_state, packed_nbytes, unpack_state
from tests.federated_helpers import bundle_record, record_arrays

MCFG = model_config("tiny", img_size=32, depth=2, decoder_depth=1)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _message(kind: str, phase: str, state: dict[str, torch.Tensor] | None, **extra: object) -> Message:
    config = RoundConfig(phase=phase, server_round=1, model_name="tiny", model_config=to_mapping(MCFG)).encode()
    config.update(extra)
    content = RecordDict({"config": ConfigRecord(config)})
    if state is not None:
        content["arrays"] = bundle_record(pack_state(state, "fp16"))
    return Message(content, dst_node_id=7, message_type=kind)


def _ctx(index: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": index}, state=RecordDict(), run_config={})


def test_query_reports_counts_only(sites: list[Path]) -> None:
    reply = make_client_app(sites)(_message("query", "pretrain", None), _ctx(0))
    q = QueryReply.decode(dict(reply.content["metrics"]))
    assert q.num_labelled_train + q.num_labelled_val + q.num_labelled_test == 5
    assert q.epsilon == 0.0 and not q.dp_enabled
    assert reply.content["site"]["site-name"] == "site0"
    assert not reply.content.array_records


@pytest.mark.parametrize("phase, compression", [("pretrain", "fp16"), ("finetune", "int8")])
def test_train_replies_update_and_schema_metrics(sites: list[Path], phase: str, compression: str) -> None:
    model = build_mae(MCFG, seed=0) if phase == "pretrain" else ILDClassifier(MCFG, 4)
    state = model.state_dict()
    reply = make_client_app(sites)(_message("train", phase, state, compression=compression, **{"proximal-mu": 0.1}),
                                   _ctx(1))
    metrics = TrainReply.decode(dict(reply.content["metrics"]))
    assert metrics.num_examples >= 1 and metrics.server_round == 1 and metrics.loss is not None
    assert (metrics.accuracy is not None) == (phase == "finetune")
    packed = record_arrays(reply.content["arrays"], deflate=compression == "int8")
    delta = unpack_state(packed)
    assert list(reply.content["arrays"].keys()) == ["layout", "payload"]  # one bundle, not one array per tensor
    sent = reply.content["arrays"]["payload"].numpy().nbytes  # int8: deflated, so fewer than the packed bytes
    assert set(delta) == set(state) and metrics.update_bytes == sent
    assert (sent < packed_nbytes(packed)) == (compression == "int8")
    moved = sum(float(d.abs().sum()) for d in delta.values())
    assert moved > 0 and all(torch.isfinite(d).all() for d in delta.values())


def test_linear_probe_sends_trainable_part_only(sites: list[Path]) -> None:
    state = ILDClassifier(MCFG, 4).state_dict()
    reply = make_client_app(sites)(_message("train", "finetune", state, **{"finetune-mode": "linear-probe"}), _ctx(0))
    assert sorted(record_arrays(reply.content["arrays"])) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]


@pytest.mark.parametrize("phase, split", [("pretrain", "val"), ("finetune", "val"), ("final", "test")])
def test_evaluate(sites: list[Path], phase: str, split: str) -> None:
    state = (build_mae(MCFG, seed=0) if phase == "pretrain" else ILDClassifier(MCFG, 4)).state_dict()
    reply = make_client_app(sites)(_message("evaluate", phase, state, split=split), _ctx(0))
    metrics = EvalReply.decode(dict(reply.content["metrics"]), num_classes=4)
    assert metrics.num_examples >= 1
    if phase != "pretrain":  # the test sites' policy min-count is 1: the per-class figures are sent
        assert sum(metrics.confusion_matrix) == metrics.num_examples and not metrics.suppressed
        assert len(metrics.score_histogram) == 2 * 4 * 100
    else:
        assert metrics.l1_masked is not None and metrics.accuracy is None


def test_missing_cache_is_a_clear_error_without_paths(sites: list[Path]) -> None:
    with pytest.raises(Exception) as info:
        make_client_app(sites)(_message("query", "pretrain", None), _ctx(2))
    text = str(info.value)
    assert "site 'site-broken' cannot serve query pretrain" in text and "lungmae site prepare" in text
    assert "no-cache" not in text and "/" not in text.split("prepare")[0]


def test_bad_weights_and_config_are_refused(sites: list[Path]) -> None:
    wrong = {"x": torch.zeros(2)}
    reply = make_client_app(sites)(_message("train", "pretrain", wrong), _ctx(0))
    assert reply.has_error() and "contract error" in reply.error.reason
    assert "'x': unexpected" in reply.error.reason and "missing" in reply.error.reason
    msg = _message("train", "pretrain", build_mae(MCFG, seed=0).state_dict())
    del msg.content["config"]["model-config"]
    reply = make_client_app(sites)(msg, _ctx(0))
    assert reply.has_error() and "contract error" in reply.error.reason and "'model-config'" in reply.error.reason
    with pytest.raises(Exception, match="cannot serve query pretrain: its site.yaml is invalid"):
        make_client_app(sites)(_message("query", "pretrain", None), _ctx(5))


def test_a_cache_windowed_otherwise_is_refused_without_paths(sites: list[Path]) -> None:
    data = yaml.safe_load(sites[0].read_text())
    data["preprocess"]["hu-max"] = 400.0
    other = sites[0].parent / "site-other-window.yaml"  # beside site.yaml: its relative paths still resolve
    other.write_text(yaml.safe_dump(data))
    msg = _message("train", "pretrain", build_mae(MCFG, seed=0).state_dict())
    try:
        with pytest.raises(Exception, match="cannot serve train pretrain: its site.yaml is invalid") as info:
            make_client_app([other])(msg, _ctx(0))
    finally:
        other.unlink()
    assert str(sites[0].parent) not in str(info.value)


def test_the_site_log_chains_what_was_asked_and_released(sites: list[Path]) -> None:
    """Every exchange lands in the site's own hash-chained log: released (names and sizes only) or refused."""
    import json

    from client.site_audit import site_audit_path, verify_site_audit
    from client.site_config import load_site_config

    cfg = load_site_config(sites[0])
    app = make_client_app(sites)
    app(_message("query", "pretrain", None), _ctx(0))
    msg = _message("train", "pretrain", build_mae(MCFG, seed=0).state_dict())
    del msg.content["config"]["model-config"]
    app(msg, _ctx(0))
    log_path = site_audit_path(cfg)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    events = [r for r in records if r["event"] in ("released", "refused")][-2:]
    assert [e["event"] for e in events] == ["released", "refused"]
    assert events[0]["message_type"] == "query" and events[0]["arrays"] == 0
    assert events[0]["num_examples"] >= 1 and "num_examples" in events[0]["metrics"]
    assert "contract error" in events[1]["reason"]
    assert verify_site_audit(log_path).ok


def test_cross_site_local_model_needs_the_sites_consent(sites: list[Path], tmp_path: Path) -> None:
    """A site announces its share-local-model policy in the query; a cross-site train request is served by the
    fine-tuning code path when it shares, and refused (policy refusal, nothing trained) when it does not."""
    import dataclasses

    from client.policy import POLICY_REFUSAL_CODE
    from client.site_config import load_site_config, write_site_config

    cfg = load_site_config(sites[0])
    policy = dataclasses.replace(cfg.policy, share_local_model=False)
    private = write_site_config(dataclasses.replace(cfg, policy=policy), tmp_path / "private" / "site.yaml")
    app = make_client_app([sites[0], private])
    shared_q = QueryReply.decode(dict(app(_message("query", "cross-site", None), _ctx(0)).content["metrics"]))
    private_q = QueryReply.decode(dict(app(_message("query", "cross-site", None), _ctx(1)).content["metrics"]))
    assert shared_q.share_local_model and not private_q.share_local_model
    assert private_q.min_count == cfg.policy.min_count
    state = ILDClassifier(MCFG, 4).state_dict()
    reply = app(_message("train", "cross-site", state, split="test"), _ctx(0))
    assert TrainReply.decode(dict(reply.content["metrics"])).num_examples >= 1 and reply.content["arrays"]
    refused = app(_message("train", "cross-site", state, split="test"), _ctx(1))
    assert refused.has_error() and refused.error.code == POLICY_REFUSAL_CODE
    assert "policy.share-local-model" in refused.error.reason
    scored = app(_message("evaluate", "cross-site", state, split="test"), _ctx(1))  # it still scores models
    assert EvalReply.decode(dict(scored.content["metrics"]), num_classes=4).num_examples >= 1


def test_the_deployed_app_reads_the_site_from_the_node_config(sites: list[Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployment: no site list; the SuperNode's node config (or LUNGMAE_SITE_CONFIG) names site.yaml."""
    from client.client_app import app

    monkeypatch.delenv("LUNGMAE_SITE_CONFIG", raising=False)
    ctx = Context(run_id=1, node_id=7, node_config={"site-config": str(sites[1])}, state=RecordDict(),
                  run_config={})
    reply = app(_message("query", "pretrain", None), ctx)
    assert reply.content["site"]["site-name"] == "site1"
    with pytest.raises(Exception, match="site 'site' cannot serve query pretrain: its site.yaml is invalid"):
        app(_message("query", "pretrain", None), _ctx(0))  # a node config without site-config
    monkeypatch.setenv("LUNGMAE_SITE_CONFIG", str(sites[0]))
    assert app(_message("query", "pretrain", None), _ctx(0)).content["site"]["site-name"] == "site0"


def test_the_site_is_read_once_per_file_version(sites: list[Path], tmp_path: Path) -> None:
    """One process serving many messages validates site.yaml once; an edited file is read again."""
    import os

    from client.site_state import site_for

    copy = tmp_path / "site.yaml"
    copy.write_text(sites[0].read_text().replace("name: site0", "name: copy-a"))
    ctx = Context(run_id=1, node_id=7, node_config={"site-config": str(copy)}, state=RecordDict(), run_config={})
    first = site_for(ctx)
    assert site_for(ctx) is first and first.name == "copy-a"
    copy.write_text(sites[0].read_text().replace("name: site0", "name: copy-b"))
    os.utime(copy, ns=(first_ns := copy.stat().st_mtime_ns, first_ns + 1_000_000))
    assert site_for(ctx).name == "copy-b"
    copy.write_text("site: [not, a, mapping]\n")
    from lungmae_core.errors import SiteConfigError

    with pytest.raises(SiteConfigError):
        site_for(ctx)


def test_the_simulation_mod_keeps_the_runs_state(sites: list[Path]) -> None:
    """The mod routes partition-id to a site.yaml on a copy of the Context; the policy's counts still persist."""
    from client.policy import Usage

    app = make_client_app(sites)
    ctx = _ctx(0)
    state = ILDClassifier(MCFG, 4).state_dict()
    app(_message("evaluate", "finetune", state, split="val"), ctx)
    app(_message("evaluate", "finetune", state, split="val"), ctx)
    assert Usage.load(ctx.state).evaluations == 2
    assert "site-config" not in ctx.node_config  # the node's own config is left as Flower gave it
