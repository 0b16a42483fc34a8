"""A run through the warm ClientApp process: real flower-superlink, the site launcher's SuperNode, `flwr run`.

The SuperNode is started the way `lungmae site start` starts it (``python -m client.supernode --warm-socket
...``, bundle check included; insecure loopback here, TLS is the deployment tests' business), so every message
is run by a child forked from the site's warm process. Success: ``finished:completed``, the bundle accepted
in the site's own log, the warm process ready and never bypassed; afterwards no process of this test is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from lungmae_cli._process import flower_env
from tests.e2e.processes import free_port, stop_groups, tagged_pids, wait_for
from tests.federated_helpers import prepared_sites

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _events(log: Path, digest: str) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines()
               if (e := json.loads(line)).get("event") == "fab-accepted" and e.get("fab_sha256") == digest)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_run_completes_through_the_warm_clientapp_process(tmp_path: Path,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    from flwr.cli.build import build_fab_from_disk

    from client.site_audit import site_audit_path
    from client.site_config import load_site_config
    from client.warm_clientapp import warm_socket_path
    from lungmae_core.signing import fab_sha256

    original = prepared_sites(tmp_path_factory.mktemp("sites"))[0]
    digest = fab_sha256(build_fab_from_disk(REPO))
    data = yaml.safe_load(original.read_text())
    data["trust"] = {"fab-sha256": [digest]}
    site = original.with_name("site-warm.yaml")  # beside the original: its relative paths still hold
    site.write_text(yaml.safe_dump(data))
    cfg = load_site_config(site)
    audit, sock = site_audit_path(cfg), warm_socket_path(cfg.site.state_dir)
    accepted_before = _events(audit, digest)

    tag = uuid.uuid4().hex
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = flower_env(dict(os.environ, FLWR_HOME=str(home), LUNGMAE_CLIENT_THREADS="1", PYTHONPATH=str(REPO),
                          FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1", LUNGMAE_E2E_TAG=tag))
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        logs.append(log)
        proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=False)

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"])
        start("supernode", [sys.executable, "-m", "client.supernode", "--site-config", str(site),
                            "--warm-socket", str(sock), "--", str(BIN / "flower-supernode"), "--insecure",
                            "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                            "--node-config", f'site-config="{site}"'])
        wait_for("the warm ClientApp process's socket", sock.exists, 180, 0.2)
        fed = tmp_path / "federation.yaml"
        fed.write_text("model: {name: tiny, overrides: {img-size: 32, depth: 2, decoder-depth: 1}}\n"
                       "phases:\n"
                       "  pretrain: {rounds: 1, local-epochs: 1, min-sites: 1, evaluate-every: 0}\n"
                       "  finetune: {rounds: 1, local-epochs: 1, min-sites: 1, evaluate-every: 0}\n"
                       "round-timeout-s: 180\n")
        res = flwr("run", ".", "e2e", "--format", "json", "--run-config",
                   f"federation-config='{fed}' run-dir='{tmp_path / 'run'}'")
        assert res.returncode == 0, res.stdout + res.stderr
        run_id = json.loads(res.stdout)["run-id"]

        def finished() -> str:
            listing = flwr("list", "e2e", "--run-id", str(run_id), "--format", "json")
            runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
            status = runs[0].get("status", "") if runs else ""
            return status if status.startswith("finished") else ""

        status = wait_for(f"run {run_id} to finish", finished, 300, 2)
        node_log = (tmp_path / "supernode.log").read_text()
        assert status == "finished:completed", f"run {run_id} ended as {status!r}\n{node_log[-4000:]}"
    finally:
        stop_groups(procs, logs, term_s=20)
        try:
            wait_for("every process of this test to exit", lambda: not tagged_pids(tag), 30, 0.5)
        finally:
            for pid in tagged_pids(tag):
                os.kill(pid, signal.SIGKILL)
    assert "warm ClientApp process ready" in node_log
    assert "running the ClientApp in this process" not in node_log, "a task bypassed the warm process"
    assert _events(audit, digest) >= accepted_before + 2, "every message's bundle is checked in the forked child"
    assert not sock.exists()
