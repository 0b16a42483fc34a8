"""The site against a hostile coordinator: constructed requests, each refused by the rule it breaks.

Every refusal is a reply error naming the ``site.yaml`` policy key (or the contract), a line in the site's
log, and nothing else: no model built, no scan loaded, nothing counted. The last test runs a whole
federation in which every site refuses part of what is asked and shows that the honest run still finishes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import CONTRACT_ERROR_CODE, make_client_app
from client.policy import POLICY_REFUSAL_CODE, Usage
from client.privacy_gate import WITNESS_NAME
from lungmae_core.bundle import bundle
from lungmae_core.config import model_config, to_mapping
from lungmae_core.contract import CONTRACT_VERSION, RoundConfig, TrainReply
from lungmae_core.heads import ILDClassifier
from lungmae_core.model import build_mae
from lungmae_core.wire import pack_state
from tests.federated_helpers import bundle_record

pytestmark = pytest.mark.usefixtures("flower_task_identity")

MCFG = model_config("tiny", img_size=32, depth=2, decoder_depth=1)


def _message(kind: str, phase: str = "finetune", *, state: bool = True, config: dict | None = None,
             **fields: object) -> Message:
    base = RoundConfig(phase=phase, server_round=1, model_name="tiny", model_config=to_mapping(MCFG), phase_rounds=2,
                       phase_round=1)
    encoded = dataclasses.replace(base, **fields).encode() if fields else base.encode()
    encoded.update(config or {})
    content = RecordDict({"config": ConfigRecord(encoded)})
    if state:
        model = build_mae(MCFG, seed=0) if phase == "pretrain" else ILDClassifier(MCFG, 4)
        content["arrays"] = bundle_record(pack_state(model.state_dict(), "fp16"))
    return Message(content, dst_node_id=7, message_type=kind)


def _ctx() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _site_with(sites: list[Path], name: str, **sections: dict) -> Path:
    """A copy of site0's site.yaml (beside it, so relative paths resolve) with some sections changed."""
    data = yaml.safe_load(sites[0].read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = sites[0].parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refusal(reply: Message, key: str) -> str:
    assert reply.has_error(), "the site served a request outside its policy"
    assert reply.error.code == POLICY_REFUSAL_CODE and f"policy refusal: {key}:" in reply.error.reason
    return reply.error.reason


@pytest.mark.parametrize("kind, fields, config, key, detail", [
    ("evaluate", {"split": "train"}, None, "policy.evaluation-splits", "split 'train' is not allowed"),
    ("evaluate", {"model_name": "evil-net"}, None, "policy.allowed-models", "model 'evil-net' is not allowed"),
    ("train", {"model_config": to_mapping(model_config("tiny", embed_dim=16384, num_heads=16, mlp_dim=65536,
                                                       depth=8, img_size=32))},
     None, "policy.max-parameters", "25,872,449,540 parameters"),
    ("train", {"model_config": to_mapping(model_config("tiny", img_size=1024))}, None, "policy.max-image-size",
     "image size 1024 exceeds 256"),
    ("train", {"local_epochs": 500}, None, "policy.max-local-epochs", "500 local epochs exceed 20"),
    ("train", {"batch_size": 4096}, None, "policy.max-batch-size", "batch size 4096 exceeds 64"),
    ("train", {"class_names": ("uip", "nsip")}, None, "data.classes",
     "the federation's classes (uip, nsip) are not this site's (normal, ggo, fibrosis, emphysema)"),
])
def test_requests_outside_the_policy_are_refused_before_any_work(sites: list[Path], caplog, kind: str,
                                                                 fields: dict, config: dict | None, key: str,
                                                                 detail: str) -> None:
    ctx = _ctx()
    with caplog.at_level(logging.WARNING, logger="client.policy"):
        reply = make_client_app(sites)(_message(kind, state=False, config=config, **fields), ctx)
    # no arrays were even sent: the refusal comes before the site builds a model or loads a weight
    assert detail in _refusal(reply, key) and "(site 'site0')" in reply.error.reason
    assert any(key in r.getMessage() and "site0" in r.getMessage() for r in caplog.records)  # the site's own log
    assert Usage.load(ctx.state) == Usage()  # a refused request is not counted as served


def test_evaluations_over_the_cap_are_refused(sites: list[Path]) -> None:
    path = _site_with(sites, "site-two-evals", policy={"max-evaluations-per-run": 2})
    try:
        app, ctx = make_client_app([path]), _ctx()
        for _ in range(2):
            assert not app(_message("evaluate"), ctx).has_error()
        detail = _refusal(app(_message("evaluate"), ctx), "policy.max-evaluations-per-run")
        assert "already served 2 evaluations" in detail
        fresh = app(_message("evaluate"), _ctx())  # another run (its own Context) starts counting again
        assert not fresh.has_error()
    finally:
        path.unlink()


def test_rounds_over_the_cap_are_refused(sites: list[Path]) -> None:
    path = _site_with(sites, "site-one-round", policy={"max-rounds-per-run": 1})
    try:
        app, ctx = make_client_app([path]), _ctx()
        assert not app(_message("train", "pretrain"), ctx).has_error()
        _refusal(app(_message("train", "pretrain"), ctx), "policy.max-rounds-per-run")
    finally:
        path.unlink()


def test_a_dp_site_releases_no_training_metrics(sites: list[Path], tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    # DP work leaves a witness file in the cache; a copy keeps the session's shared site0 cache DP-free
    cache = sites[0].parent / yaml.safe_load(sites[0].read_text())["data"]["cache"]
    shutil.copytree(cache, tmp_path / "cache")
    path = _site_with(sites, "site-dp", privacy={"enabled": True, "epsilon": 50.0, "noise-multiplier": 1.0,
                                                 "ledger": str(ledger)}, data={"cache": str(tmp_path / "cache")})
    try:
        app = make_client_app([path])
        asked = app(_message("train", "pretrain", train_metrics="required"), _ctx())
        assert "under DP the site does not release unnoised training loss" in _refusal(asked, "privacy.enabled")
        assert not ledger.exists()  # refused before the privacy gate: nothing spent
        reply = app(_message("train", "pretrain"), _ctx())
        metrics = TrainReply.decode(dict(reply.content["metrics"]))
        assert metrics.epsilon > 0 and metrics.loss is None and metrics.loss_lung is None
        assert dict(reply.content["metrics"])["loss_defined"] == 0
        assert (tmp_path / "cache" / WITNESS_NAME).is_file() and not (cache / WITNESS_NAME).exists()
    finally:
        path.unlink()


def test_small_splits_get_no_per_class_counts(sites: list[Path]) -> None:
    """Default policy min-count 10: a 1-3 scan validation split sends pooled figures only."""
    path = _site_with(sites, "site-default-min", policy={"min-count": 10})
    try:
        reply = make_client_app([path])(_message("evaluate"), _ctx())
        metrics = dict(reply.content["metrics"])
        assert metrics["suppressed"] == 1 and metrics["confusion_matrix"] == [] and metrics["score_histogram"] == []
        assert metrics["accuracy_defined"] == 1
    finally:
        path.unlink()


@pytest.mark.parametrize("change, field", [
    ({"contract-version": 1}, f"contract version 1 but this side speaks version {CONTRACT_VERSION}"),
    ({"split": "everything"}, "'split' must be one of train, val, test"),
    ({"lr": float("nan")}, "'lr' must be finite"),
    ({"class-names": ["normal"]}, "'class-names' must have 2..64 names"),
    ({"surprise": 1}, "unexpected keys ['surprise']"),
])
def test_a_request_that_breaks_the_contract_is_refused(sites: list[Path], change: dict, field: str) -> None:
    reply = make_client_app(sites)(_message("train", "pretrain", config=change), _ctx())
    assert reply.has_error() and reply.error.code == CONTRACT_ERROR_CODE and field in reply.error.reason


def _fp16_state(kind: str = "finetune") -> dict[str, np.ndarray]:
    model = build_mae(MCFG, seed=0) if kind == "pretrain" else ILDClassifier(MCFG, 4)
    return pack_state(model.state_dict(), "fp16")


def _forged_global(packed: dict[str, np.ndarray]) -> dict[str, Array]:
    """A bundle whose layout is rewritten to describe ``packed`` (what a hostile server can send)."""
    return {k: Array(v) for k, v in bundle(packed).items()}


def _with_arrays(arrays: dict[str, Array]) -> Message:
    msg = _message("evaluate")
    msg.content["arrays"] = ArrayRecord(array_dict=arrays)
    return msg


def _int_in_place_of_float(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    name = next(iter(packed))
    return {**packed, name: np.zeros(packed[name].shape, np.int64)}  # a load would cast it silently


def _wider(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    name = next(k for k, v in packed.items() if v.ndim == 2)
    return {**packed, name: np.zeros((packed[name].shape[0], packed[name].shape[1] * 2), np.float16)}


def _payload_longer_than_layout() -> dict[str, Array]:
    arrays = bundle(_fp16_state())
    return {"layout": Array(arrays["layout"]), "payload": Array(np.concatenate([arrays["payload"],
                                                                               np.zeros(8, np.uint8)]))}


def _layout_not_json() -> dict[str, Array]:
    arrays = bundle(_fp16_state())
    return {"layout": Array(np.frombuffer(b"[[\"w\", [1e99], ", np.uint8).copy()), "payload": Array(arrays["payload"])}


@pytest.mark.parametrize("arrays, detail", [
    (lambda: {k: Array(v) for k, v in _fp16_state().items()}, "exactly the arrays 'layout' and 'payload'"),
    (_payload_longer_than_layout, "but the payload has"),
    (_layout_not_json, "layout is not UTF-8 JSON"),
    (lambda: _forged_global(_int_in_place_of_float(_fp16_state())), "'int64') (expected ((192, 6144), 'float16'))"),
    (lambda: _forged_global(_wider(_fp16_state())), "does not match the requested model-config"),
    (lambda: _forged_global({**_fp16_state(), "extra": np.zeros(3, np.float16)}), "'extra': unexpected"),
    (lambda: _forged_global(pack_state(ILDClassifier(MCFG, 4).state_dict(), "fp32")), "expected"),
])
def test_a_global_model_other_than_the_requested_one_is_refused(sites: list[Path], arrays, detail: str) -> None:
    """The site reads no value of a global whose bundle is malformed or whose layout is not its model's."""
    reply = make_client_app(sites)(_with_arrays(arrays()), _ctx())
    assert reply.has_error() and reply.error.code == CONTRACT_ERROR_CODE, reply.error.reason
    assert "arrays" in reply.error.reason and detail in reply.error.reason, reply.error.reason


def test_the_honest_bundle_is_accepted(sites: list[Path]) -> None:
    reply = make_client_app(sites)(_with_arrays(dict(bundle_record(_fp16_state()).items())), _ctx())
    assert not reply.has_error()


def test_a_message_without_config_is_a_contract_error(sites: list[Path]) -> None:
    msg = _message("evaluate")
    del msg.content["config"]
    reply = make_client_app(sites)(msg, _ctx())
    assert reply.error.code == CONTRACT_ERROR_CODE and "no ConfigRecord 'config'" in reply.error.reason


def test_the_honest_run_finishes_while_the_sites_refuse_validation_evaluations(sites: list[Path],
                                                                                 tmp_path: Path) -> None:
    """Both sites allow only test evaluations: every per-round val evaluation is refused, the run completes."""
    from server.federation_config import federation_from_mapping
    from server.runner import FederationRunner
    from tests.federated_helpers import InProcessGrid

    paths = [_site_with([s], f"site-test-only-{i}", policy={"evaluation-splits": ["test"]})
             for i, s in enumerate(sites[:2])]
    try:
        cfg = federation_from_mapping({
            "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
            "phases": {"pretrain": {"rounds": 1}, "finetune": {"rounds": 1}}, "run-dir": str(tmp_path / "run"),
            "round-timeout-s": 5}, source="test")
        summary = FederationRunner(cfg, InProcessGrid(make_client_app(paths), [{"partition-id": 0},
                                                                              {"partition-id": 1}])).run()
    finally:
        for p in paths:
            p.unlink()
    assert summary["status"] == "completed"
    rounds = [r for phase in summary["phases"].values() for r in phase]
    assert all(r["train_sites"].keys() == {"site0", "site1"} for r in rounds)
    assert summary["counters"]["failed"] == {"site0": 2, "site1": 2}  # the refused val evaluations
    assert set(summary["final"]["sites"]) == {"site0", "site1"}
