"""Tests for server/ops/run_control.py: following a run, resubmitting after SuperLink restarts, giving up."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from lungmae_cli._process import flower_env
from server.ops.run_control import RUN_RECORD, FlwrCLI, FlwrCLIError, RunFollower


class ScriptedCLI:
    """Answers of the Flower CLI in order (None = SuperLink unreachable); records what was asked."""

    def __init__(self, statuses: list[dict[str, Any] | None], log: str = "") -> None:
        self.statuses = list(statuses)
        self.submitted: list[int] = []
        self.stopped: list[int] = []
        self.log = log

    def submit(self, app_dir: Path, run_config: dict[str, str]) -> int:
        assert run_config["federation-config"].endswith("federation.yaml")
        self.submitted.append(100 + len(self.submitted))
        return self.submitted[-1]

    def run_status(self, run_id: int) -> dict[str, Any] | None:
        return self.statuses.pop(0)

    def stop(self, run_id: int) -> bool:
        self.stopped.append(run_id)
        return True

    def run_log(self, run_id: int) -> str:
        return self.log


def _st(status: str, details: str = "N/A") -> dict[str, Any]:
    return {"status": status, "status-details": details, "elapsed": 12.0}


def _follower(tmp_path: Path, cli: ScriptedCLI, lines: list[str], **kw: Any) -> RunFollower:
    return RunFollower(cli, tmp_path, tmp_path / "federation.yaml", tmp_path / "run", poll_s=0, say=lines.append,
                       **kw)


def test_submits_follows_and_records_the_run(tmp_path: Path) -> None:
    cli, lines = ScriptedCLI([_st("starting"), _st("running"), _st("finished:completed")]), []
    assert _follower(tmp_path, cli, lines).follow() == 0
    assert cli.submitted == [100] and not cli.stopped
    assert json.loads((tmp_path / "run" / RUN_RECORD).read_text())["run_id"] == 100
    assert lines[-1].startswith("run 100 completed")


def test_superlink_restart_stops_the_dead_run_and_resubmits(tmp_path: Path) -> None:
    cli, lines = ScriptedCLI([_st("running"), None, None, _st("running"), _st("finished:stopped"),
                              _st("running"), _st("finished:completed")]), []
    follower = _follower(tmp_path, cli, lines)
    assert follower.follow() == 0
    assert cli.stopped == [100] and cli.submitted == [100, 101] and follower.restarts == 1
    assert any("SuperLink unreachable" in line for line in lines)
    assert any("resubmitting, the ServerApp resumes from the last checkpoint" in line for line in lines)


def test_missed_heartbeat_is_resubmitted_but_an_app_failure_is_not(tmp_path: Path) -> None:
    cli, lines = ScriptedCLI([_st("finished:failed", "No heartbeat received from the task"),
                              _st("finished:completed")]), []
    assert _follower(tmp_path, cli, lines).follow() == 0 and cli.submitted == [100, 101]

    cli, lines = ScriptedCLI([_st("finished:failed", "ServerApp raised")], log="a\nTraceback: ValueError: bad"), []
    assert _follower(tmp_path / "b", cli, lines).follow() == 1 and cli.submitted == [100]
    assert "ValueError: bad" in lines[-1] and "finished:failed (ServerApp raised)" in lines[-1]


def test_gives_up_after_max_restarts(tmp_path: Path) -> None:
    dead = _st("finished:failed", "No heartbeat received from the task")
    cli, lines = ScriptedCLI([dead, dead, dead]), []
    assert _follower(tmp_path, cli, lines, max_restarts=2).follow() == 1
    assert cli.submitted == [100, 101, 102]


def test_follows_a_recorded_active_run_without_submitting(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_RECORD).write_text(json.dumps({"run_id": 7}))
    cli, lines = ScriptedCLI([_st("running"), _st("running"), _st("finished:completed")]), []
    assert _follower(tmp_path, cli, lines).follow() == 0
    assert cli.submitted == [] and "following run 7" in lines[0]


def test_unreachable_too_long_exits_3(tmp_path: Path) -> None:
    cli, lines = ScriptedCLI([_st("running")] + [None] * 5), []
    assert _follower(tmp_path, cli, lines, unreachable_limit_s=0).follow() == 3


def test_real_flwr_cli_reports_an_unreachable_superlink_as_none(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "config.toml").write_text(f'[superlink]\ndefault = "lungmae"\n[superlink.lungmae]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = dict(flower_env(), FLWR_HOME=str(tmp_path))  # finds flwr next to this Python, venv active or not
    cli = FlwrCLI(env=env, timeout_s=60)
    assert cli.run_status(1) is None
    with pytest.raises(FlwrCLIError, match="SuperLink connection 'nope' not found"):
        FlwrCLI(connection="nope", env=env, timeout_s=60).nodes()
