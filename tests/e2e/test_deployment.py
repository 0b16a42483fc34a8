"""The same apps on real Flower processes: flower-superlink + 2 flower-supernodes on 127.0.0.1, `flwr run`.

Insecure loopback only (TLS and node authentication are the deployment area's tests). One pretrain and one
finetune round with two prepared synthetic sites; success is read from `flwr list` (``finished:completed``),
not from the CLI's exit code, and every process started here is stopped in teardown.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lungmae_cli._process import flower_env
from tests.e2e.processes import stop_groups
from tests.federated_helpers import prepared_sites

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture()
def flower(tmp_path: Path) -> Iterator[dict]:
    # flower_env puts this venv's scripts first on PATH: the SuperLink starts `flower-superexec` by name, which
    # fails when the venv is not activated (`.venv/bin/python -m pytest`, as `make test` runs it).
    env = flower_env(dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
                          FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                          LUNGMAE_CLIENT_THREADS="1", PYTHONPATH=str(REPO)))
    port = _free_port()
    Path(env["FLWR_HOME"]).mkdir()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        link = start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                   "--port", str(port), "--disable-runtime-dependency-installation"])
        _wait_port(port, link)
        yield {"env": env, "port": port, "start": start, "tmp": tmp_path}
    finally:
        stop_groups(procs, logs, term_s=15)  # SuperNodes first, then the SuperLink


def _flwr(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flwr_run_on_superlink_and_two_supernodes(flower: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    sites = prepared_sites(tmp_path_factory.mktemp("sites"))
    for i, site in enumerate(sites):
        flower["start"](f"supernode{i}", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{flower['port']}",
            "--port", str(_free_port()),
            "--node-config", f'site-config="{site}"'])
    run_dir = flower["tmp"] / "run"
    fed = flower["tmp"] / "federation.yaml"
    fed.write_text(
        "model: {name: tiny, overrides: {img-size: 32, depth: 2, decoder-depth: 1}}\n"
        "phases:\n"
        "  pretrain: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}\n"
        "  finetune: {rounds: 1, local-epochs: 1, min-sites: 2, evaluate-every: 0}\n"
        "round-timeout-s: 120\n")
    res = _flwr(flower["env"], "run", ".", "e2e", "--format", "json", "--run-config",
                f"federation-config='{fed}' run-dir='{run_dir}'")
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads(res.stdout)["run-id"]
    deadline, status = time.monotonic() + 240, ""
    while time.monotonic() < deadline:
        listing = _flwr(flower["env"], "list", "e2e", "--run-id", str(run_id), "--format", "json", timeout=30)
        runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
        status = runs[0].get("status", "") if runs else ""
        if status.startswith("finished"):
            break
        time.sleep(2)
    logs = "\n".join(p.read_text() for p in flower["tmp"].glob("*.log"))
    assert status == "finished:completed", f"run {run_id} ended as {status!r}\n{logs[-4000:]}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["phase"]) for x in lines] == [(1, "pretrain"), (2, "finetune")]
    assert all(sorted(x["participation"]["replied"]) == ["site0", "site1"] for x in lines)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and "pooled" in summary["final"]
