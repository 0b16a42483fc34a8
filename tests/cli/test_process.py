"""Tests for lungmae_cli/_process.py: output relay, Flower exit-code advice, retries, signal forwarding."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from lungmae_cli._process import flower_env, run_forwarding_signals


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_flower_exit_code_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cmd = _script(tmp_path, "print('starting'); print('Exit Code: 305'); raise SystemExit(1)\n")
    out = io.StringIO()
    status = run_forwarding_signals(cmd, flower_env(), {305: "register the key"}, name="SuperNode", out=out)
    assert status == 1 and "Exit Code: 305" in out.getvalue()
    assert "the SuperNode stopped with Flower exit code 305: register the key" in capsys.readouterr().err


def test_refused_activation_is_retried_until_let_in(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    counter = tmp_path / "starts"
    cmd = _script(tmp_path, f"import pathlib\np = pathlib.Path({str(counter)!r})\n"
                            "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
                            "if len(p.read_text()) < 3:\n    print('Exit Code: 305'); raise SystemExit(1)\n"
                            "print('activated')\n")
    out = io.StringIO()
    status = run_forwarding_signals(cmd, flower_env(), {}, name="SuperNode", out=out, retry_codes=(305,),
                                    retry_for_s=120, retry_every_s=0.2, retry_note="still online")
    assert status == 0 and counter.read_text() == "xxx" and "activated" in out.getvalue()
    assert capsys.readouterr().err.count("retrying in 0.2 s (still online)") == 2


def test_retry_window_closes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cmd = _script(tmp_path, "print('Exit Code: 305'); raise SystemExit(1)\n")
    status = run_forwarding_signals(cmd, flower_env(), {305: "not registered"}, name="SuperNode", out=io.StringIO(),
                                    retry_codes=(305,), retry_for_s=0.0)
    err = capsys.readouterr().err
    assert status == 1 and "retrying" not in err and "exit code 305: not registered" in err


def test_sigterm_is_forwarded_and_counts_as_a_clean_stop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cmd = _script(tmp_path, "import signal, sys, time\n"
                            "signal.signal(signal.SIGTERM, lambda *a: (print('child got SIGTERM'), sys.exit(0)))\n"
                            "print('ready', flush=True)\ntime.sleep(60)\n")
    out = io.StringIO()
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        status = run_forwarding_signals(cmd, flower_env(), {}, name="SuperLink", out=out)
    finally:
        timer.cancel()
    assert status == 0 and "child got SIGTERM" in out.getvalue()
    assert "the SuperLink stopped on request" in capsys.readouterr().err


def test_output_goes_to_stdout_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_forwarding_signals(_script(tmp_path, "print('hello from flower')\n"), flower_env(), {},
                                  name="SuperNode") == 0
    assert "hello from flower" in capsys.readouterr().out


def test_missing_program(capsys: pytest.CaptureFixture) -> None:
    assert run_forwarding_signals(["no-such-flower-binary"], {}, {}, name="SuperNode") == 127
    assert "`no-such-flower-binary` is not installed" in capsys.readouterr().err


def test_telemetry_is_off_unless_asked() -> None:
    assert flower_env({"FLWR_TELEMETRY_ENABLED": "1"})["FLWR_TELEMETRY_ENABLED"] == "0"
    assert flower_env({}, telemetry=True)["FLWR_TELEMETRY_ENABLED"] == "1"
    assert flower_env({})["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_this_pythons_scripts_come_first_on_path() -> None:
    """`.venv/bin/python -m pytest` or a systemd unit: flwr and flower-* are found without activating."""
    env = flower_env({"PATH": "/usr/bin"})
    first = env["PATH"].split(os.pathsep)[0]
    assert first == str(Path(sys.executable).parent) and (Path(first) / "flower-superlink").exists()
