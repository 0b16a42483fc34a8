"""Deployment on real processes over TLS on 127.0.0.1: our commands, Flower's SuperLink/SuperNodes, Prometheus.

One federation carries every scenario of issue 6, because each Flower message starts a new Python process
and a federation costs minutes on two cores:

1. `lungmae certs` makes the CA, the server certificate and three site keys; `lungmae server start` runs the
   SuperLink with TLS + node authentication; site0 and site1 are registered, site2 is not.
2. Preflight passes for a registered site against the live SuperLink, and fails with the right message when
   the CA is wrong; the unregistered site2 is refused by the SuperLink and `lungmae site start` says why.
3. `lungmae server run` submits the federation (10 pretrain rounds of the tiny model); a real Prometheus
   scrapes the ServerApp's metrics and a query returns the round counter.
4. site1 is SIGKILLed while it trains round 1 and started again at once: the round finishes with site0
   within the round timeout; the SuperLink refuses site1 until its old connection expires, `lungmae site
   start` retries, and site1 is back in a later round.
5. The whole server (lungmae, SuperLink, SuperExec, ServerApp) is SIGKILLed during the next round and started again:
   `lungmae server run` resubmits, the ServerApp resumes from the last checkpoint (at most one round lost)
   and the federation completes.

Every process carries a tag in its environment; teardown kills every tagged process, even on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.processes import free_port, tagged_pids, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Round 1 ends when the killed site1's heartbeat expires (~60 s: the SuperLink's error reply) rather than by this
# timeout, and site1 is let in again a few seconds later: the rounds left (ROUNDS) must outlast that gap even on
# a quiet machine, where a round of site0 alone takes ~2 s. The timeout is also the resumed run's grace for site1.
ROUND_TIMEOUT_S = 70
ROUNDS = 10
TAG = f"lungmae-e2e-{uuid.uuid4().hex[:12]}"
LUNGMAE = [sys.executable, "-m", "lungmae_cli.main"]





def _kill_role(role: str | None, sig: int = signal.SIGKILL) -> None:
    for _ in range(3):  # a dying parent may spawn once more; repeat until none is left
        pids = tagged_pids(TAG, role)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)



class Deployment:
    """The processes of one test federation, each started with a role tag and its log file."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, args: list[str]) -> subprocess.Popen:
        env = dict(self.env, LUNGMAE_E2E_TAG=TAG, LUNGMAE_E2E_ROLE=role)
        log = open(self.root / f"{role}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                start_new_session=True)
        log.close()
        self.procs[role] = proc
        return proc

    def log(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def flwr(self, *args: str) -> dict:
        proc = subprocess.run(["flwr", *args, "--format", "json"], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        return json.loads(proc.stdout[proc.stdout.find("{"):])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill_role(None)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _prepare_sites(root: Path) -> list[Path]:
    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from lungmae_cli.synth import write_synthetic_sites

    # unlabelled scans all go to the train split: two per site are enough to pretrain
    paths = write_synthetic_sites(root / "sites", sites=2, scans_per_site=2, seed=3, shape=(40, 64, 64),
                                  labelled_fraction=0.0, preprocess_size=32, workers=1)
    for path in paths:
        prepare_site(load_site_config(path))
    return paths


def _with_connection(path: Path, out: Path, *, superlink: str, ca: Path, key: Path, node_port: int) -> Path:
    data = yaml.safe_load(path.read_text())
    data["connection"] = {"superlink": superlink, "root-certificates": str(ca), "auth-key": str(key),
                          "node-port": node_port}
    data["trust"] = {"trusted-keys": [str(ca.parents[1] / "signing/fab-signing.pub")]}  # runs only signed apps
    data["training"]["max-local-epochs"] = 1
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _metrics_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _prometheus_query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]["result"]
    except OSError:
        return []


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("tls-deploy")
    from lungmae_cli._process import flower_env

    env = dict(flower_env(), FLWR_HOME=str(root / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    dep = Deployment(root, env)
    try:
        yield dep
    finally:
        dep.stop_all()
        assert not tagged_pids(TAG), "processes of the test federation survived teardown"


def test_tls_federation_survives_site_and_server_crashes(deployment: Deployment) -> None:
    dep, root = deployment, deployment.root
    superlink_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    superlink = f"127.0.0.1:{superlink_port}"

    # 1. PKI and federation config; the SuperLink boots while the sites prepare their data ----------------
    from lungmae_cli.main import main as lungmae_main

    assert lungmae_main(["certs", "--out", str(root / "pki"), "--server-name", "localhost", "--server-ip",
                         "127.0.0.1", "--site", "site0", "--site", "site1", "--site", "site2"]) == 0
    pki = root / "pki"
    run_dir = root / "run"
    (root / "federation.yaml").write_text(yaml.safe_dump({
        "model": {"name": "tiny", "overrides": {"img-size": 32}},
        "phases": {"pretrain": {"rounds": ROUNDS, "local-epochs": 1, "min-sites": 1, "evaluate-every": 0},
                   "finetune": {"rounds": 0}},
        "round-timeout-s": ROUND_TIMEOUT_S, "run-dir": str(run_dir),
        "server": {"superlink": superlink, "root-certificates": "pki/ca/ca.crt",
                   "certificate": "pki/server/server.pem", "private-key": "pki/server/server.key",
                   "metrics-port": metrics_port}}))
    server_cmd = [*LUNGMAE, "server", "start", "--config", "federation.yaml", "--database", "state/superlink.db"]
    dep.start("server", server_cmd)
    (root / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "lungmae-server", "static_configs": [
            {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    dep.start("prometheus", ["/usr/bin/prometheus", f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'prometheus-data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"])
    synthetic = _prepare_sites(root)
    site_yaml = [_with_connection(synthetic[i % 2], synthetic[i % 2].parent / f"deploy-site{i}.yaml",
                                  superlink=superlink, ca=pki / "ca/ca.crt", key=pki / f"sites/site{i}/site{i}.key",
                                  node_port=free_port()) for i in range(3)]

    # 2. register two sites; all three start; preflight against the live SuperLink --------------------------
    wait_for("the SuperLink port", lambda: _connectable(superlink_port), 90)
    for i in (0, 1):
        out = dep.flwr("supernode", "register", str(pki / f"sites/site{i}/site{i}.pub"), "lungmae",
                       "--name", f"site{i}")
        assert out["success"], out
    for i in (0, 1, 2):
        retry = ["--activation-retry-s", "0"] if i == 2 else []  # the unregistered site: fail at once
        dep.start(f"site{i}", [*LUNGMAE, "site", "start", "--config", str(site_yaml[i]), *retry])

    from client.preflight import run_preflight, tls_probe
    from server.ops.certs import make_ca

    report = run_preflight(site_yaml[0], min_free_gb=0.01)
    assert report.ok, report.render()
    assert "reached over TLSv1." in next(r.message for r in report.results if r.name == "superlink")
    _, other_ca = make_ca(root / "other-ca")
    wrong = tls_probe(superlink, other_ca)
    assert wrong.ok is False and "its certificate is not signed by the CA" in wrong.message
    wait_for("both registered sites online", lambda: sum(
        n["status"] == "online" for n in dep.flwr("supernode", "list", "lungmae").get("nodes", [])) == 2, 120, 1)

    # 3. the federation, scraped by a real Prometheus -----------------------------------------------------
    dep.start("runner", [*LUNGMAE, "server", "run", "--config", "federation.yaml", "--poll-s", "2",
                         "--signing-key", str(pki / "signing/fab-signing.key")])
    refused = dep.procs["site2"]
    assert refused.wait(timeout=120) != 0
    assert "this site's key is not registered yet" in dep.log("site2")
    assert "exit code 305; retrying" not in dep.log("site2")

    # 4. site1 killed while it trains round 1, started again at once ---------------------------------------
    wait_for("site1 to receive the train message of round 1",
              lambda: dep.log("site1").count("Receiving: train message") >= 1, 180, 0.5)
    _kill_role("site1")
    # started again at once: the SuperLink refuses it until the crashed node's heartbeat expires (~60 s),
    # and `lungmae site start` keeps retrying until it is let in
    dep.start("site1", [*LUNGMAE, "site", "start", "--config", str(site_yaml[1])])
    # no hang: the round timeout ends the round with the sites that replied
    wait_for("round 1 without site1", lambda: len(_metrics_rounds(run_dir)) >= 1, ROUND_TIMEOUT_S + 120, 1)
    round1 = _metrics_rounds(run_dir)[0]
    assert round1["participation"]["replied"] == ["site0"], round1["participation"]
    assert round1["participation"]["failed"] == ["site1"], round1["participation"]
    counter = wait_for("Prometheus to return the round counter", lambda: _prometheus_query(
        prom_port, 'lungmae_rounds_completed_total{phase="pretrain"}'), 60, 1)
    assert float(counter[0]["value"][1]) >= 1
    failed = _prometheus_query(prom_port, 'lungmae_site_replies_total{outcome="failed"}')
    assert failed and float(failed[0]["value"][1]) >= 1, failed

    # 5. site1 back; then the whole server killed during the next round, started again -----------------------
    wait_for("site1 to be let in again", lambda: sum(
        n["status"] == "online" for n in dep.flwr("supernode", "list", "lungmae").get("nodes", [])) == 2, 180, 2)
    done = len(_metrics_rounds(run_dir))
    assert done < ROUNDS, "the federation finished before the server could be killed"
    wait_for(f"round {done + 1} to start at site0",
              lambda: dep.log("site0").count("Receiving: train message") >= done + 1, 120, 0.5)
    checkpoint_before = json.loads((run_dir / "state.json").read_text())
    _kill_role("server")
    assert not tagged_pids(TAG, "server")
    time.sleep(2)
    dep.start("server", server_cmd)

    wait_for("the runner to finish", lambda: dep.procs["runner"].poll() is not None, 400, 2)
    runner_log = dep.log("runner")
    assert dep.procs["runner"].returncode == 0, runner_log
    assert "resubmitting, the ServerApp resumes from the last checkpoint" in runner_log

    from server.audit import read_audit_log

    audit = read_audit_log(run_dir / "audit.jsonl")
    resumed = [r for r in audit if r["event"] == "run-resumed"]
    assert resumed and resumed[-1]["server_round"] >= checkpoint_before["server_round"], resumed
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    rounds = _metrics_rounds(run_dir)
    later = [r for r in rounds if r["round"] > done and "site1" in r["participation"]["replied"]]
    assert later, [r["participation"] for r in rounds]
    assert "exit code 305; retrying in 10 s" in dep.log("site1")
    accepted = {(r["site"], r["server_round"]) for r in audit if r["event"] == "update-accepted"}
    assert ("site0", 1) in accepted and ("site1", 1) not in accepted, accepted
    assert not any(k in json.dumps(audit) for k in ("patient", str(root / "sites")))

    status = json.loads(subprocess.run([*LUNGMAE, "server", "status", "--config", "federation.yaml", "--json"],
                                       cwd=root, env=dep.env, capture_output=True, text=True, timeout=180,
                                       check=True).stdout)
    assert status["superlink_reachable"] and len(status["sites"]) == 2
    assert status["flwr_run_status"]["status"] == "finished:completed"
    assert status["checkpoint"]["server_round"] == ROUNDS and status["run_status"] == "completed"


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
