"""Tests for client/fab_check.py and client/site_audit.py: which app bundles a site runs, and its own log.

The real-process version (a SuperNode refusing a tampered bundle sent by a SuperLink) is in
tests/e2e/test_proxy_deployment.py; here the policy and the launcher's interception are checked directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.fab_check import FabPolicy, FabRefused, install_launcher
from client.site_audit import record_site_event, verify_site_audit
from client.site_config import load_site_config
from lungmae_core.signing import SigningKeyError, make_signing_key, sign_fab

FAB = b"PK\x03\x04 pretend app bundle " * 50


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    key, pub = make_signing_key(tmp_path / "consortium", "fab-signing")
    other_key, other_pub = make_signing_key(tmp_path / "intruder", "fab-signing")
    return {"key": key, "pub": pub, "other_key": other_key, "other_pub": other_pub}


def _site(tmp_path: Path, trust: dict) -> Path:
    path = tmp_path / "site" / "site.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"site": {"name": "north"}, "data": {"cache": "cache"}, "trust": trust}))
    return path


def test_signed_bundle_passes_and_one_changed_byte_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    policy = FabPolicy(trusted_keys=(keys["pub"],))
    signature = sign_fab(FAB, keys["key"])
    assert policy.check(FAB, signature) == "signed by fab-signing.pub"
    tampered = FAB[:10] + bytes([FAB[10] ^ 1]) + FAB[11:]
    digest = hashlib.sha256(tampered).hexdigest()
    with pytest.raises(FabRefused, match=f"sha256 {digest} refused: its signature does not verify"):
        policy.check(tampered, signature)
    with pytest.raises(FabRefused, match="signature does not verify"):
        policy.check(FAB, sign_fab(FAB, keys["other_key"]))  # signed, but by a key the site does not trust
    with pytest.raises(FabRefused, match="it carries no signature"):
        policy.check(FAB, None)
    with pytest.raises(FabRefused, match="signature does not verify"):
        policy.check(FAB, "not base64!")


def test_allow_list_and_empty_policy(keys: dict[str, Path]) -> None:
    digest = hashlib.sha256(FAB).hexdigest()
    assert FabPolicy(allowed_sha256=frozenset({digest})).check(FAB, None) == "sha256 on the allow-list"
    with pytest.raises(FabRefused, match="names no trusted key and no fab-sha256, so this site runs no app"):
        FabPolicy().check(FAB, sign_fab(FAB, keys["key"]))


def test_policy_from_site_yaml_resolves_paths_and_checks_keys(tmp_path: Path, keys: dict[str, Path]) -> None:
    rel = os.path.relpath(keys["pub"], tmp_path / "site")
    policy = FabPolicy.from_site_config(load_site_config(_site(tmp_path, {"trusted-keys": [rel]})))
    assert policy.trusted_keys == (keys["pub"].resolve(),)
    assert policy.audit_log == (tmp_path / "site" / "state" / "site-audit.jsonl").resolve()
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        FabPolicy.from_site_config(load_site_config(_site(tmp_path, {"trusted-keys": [str(keys["key"])]})))
    with pytest.raises(Exception, match="'fab-sha256' entries must be 64 lower-case hex digits"):
        load_site_config(_site(tmp_path, {"fab-sha256": ["abc"]}))


def test_refusals_and_acceptances_are_chained_in_the_site_log(tmp_path: Path, keys: dict[str, Path]) -> None:
    log = tmp_path / "site-audit.jsonl"
    policy = FabPolicy(trusted_keys=(keys["pub"],), audit_log=log)
    policy.enforce(FAB, {"fab-signature": sign_fab(FAB, keys["key"])}, run_id=7, message_type="train")
    with pytest.raises(FabRefused):
        policy.enforce(FAB + b"x", {"fab-signature": sign_fab(FAB, keys["key"])}, run_id=8, message_type="query")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["run_id"]) for e in events] == [("fab-accepted", 7), ("fab-refused", 8)]
    assert events[1]["fab_sha256"] == hashlib.sha256(FAB + b"x").hexdigest()
    assert verify_site_audit(log).ok
    record_site_event(log, "released", server_round=1, num_examples=4, metrics=["train_loss"],
                      patient_id="P1", cache_path="/data")  # identifying fields are dropped
    last = json.loads(log.read_text().splitlines()[-1])
    assert "patient_id" not in last and "cache_path" not in last and last["num_examples"] == 4
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:1] + lines[2:]))  # a refusal removed to hide it
    report = verify_site_audit(log)
    assert not report.ok and report.broken_line == 2


def test_launcher_checks_before_install(tmp_path: Path, keys: dict[str, Path]) -> None:
    """The installed ``flwr-clientapp`` wraps Flower's install step: a refused bundle never reaches it."""
    pytest.importorskip("flwr")
    site = _site(tmp_path, {"trusted-keys": [str(keys["pub"])]})
    launcher = install_launcher(tmp_path / "bin")
    assert os.access(launcher, os.X_OK) and launcher.read_text().startswith(f"#!{sys.executable}\n")
    code = f"""
import sys, types
sys.argv = ["flwr-clientapp"]
import importlib
runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
installed = []
runtime.install_from_fab = lambda content, **kw: installed.append(content)
fab = types.SimpleNamespace(content={FAB + b"changed"!r})
ctx = types.SimpleNamespace(run_config={{"fab-signature": {sign_fab(FAB, keys["key"])!r}}})
run = types.SimpleNamespace(run_id=5)
msg = types.SimpleNamespace(metadata=types.SimpleNamespace(message_type="train"))
runtime.pull_task_input = lambda client: (msg, ctx, run, fab)
def fake_main():
    _, c, r, f = runtime.pull_task_input(None)
    try:
        runtime.install_from_fab(f.content, skip_prompt=True)
    except Exception as exc:
        print("REFUSED", type(exc).__name__)
    print("INSTALLED", len(installed))
cli.flwr_clientapp = fake_main
from client.fab_check import clientapp_main
clientapp_main()
"""
    env = dict(os.environ, LUNGMAE_SITE_CONFIG=str(site), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED FabRefused" in out.stdout and "INSTALLED 0" in out.stdout, out.stdout + out.stderr
    assert "refused: its signature does not verify" in out.stderr
    events = [json.loads(line) for line in (tmp_path / "site/state/site-audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["fab-refused"]


def test_record_exchange_logs_what_was_asked_and_released(tmp_path: Path) -> None:
    flwr = pytest.importorskip("flwr")
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.site_audit import record_exchange

    del flwr
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    log = tmp_path / "site-audit.jsonl"
    msg = Message(RecordDict({"config": ConfigRecord({"phase": "pretrain", "server-round": 3})}), dst_node_id=7,
                  message_type="train.pretrain")
    reply = Message(RecordDict({"metrics": MetricRecord({"train_loss": 0.5, "num_examples": 12}),
                                "arrays": ArrayRecord(array_dict={"w": Array(np.zeros(4, np.float32))})}),
                    reply_to=msg)
    assert record_exchange(log, msg, reply) is reply
    refusal = Message(Error(code=42, reason="privacy refusal: budget spent"), reply_to=msg)
    assert record_exchange(log, msg, refusal) is refusal
    released, refused = [json.loads(line) for line in log.read_text().splitlines()]
    assert released["event"] == "released" and released["message_type"] == "train.pretrain"
    assert (released["server_round"], released["num_examples"], released["arrays"]) == (3, 12, 1)
    assert released["metrics"] == ["num_examples", "train_loss"] and released["array_bytes"] >= 16
    assert refused["event"] == "refused" and refused["reason"] == "privacy refusal: budget spent"
    assert verify_site_audit(log).ok
