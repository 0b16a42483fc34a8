"""The launcher <-> warm ClientApp process protocol, on real processes and a real Unix socket.

The warm process runs in a subprocess (``serve`` with the test target of tests/client/warm_targets.py and no
preloading, so these tests stay fast); every process started here is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.fab_check import install_launcher
from client.warm_clientapp import WarmSocketError, launch, launcher_main, serve, socket_problem, warm_socket_path
from tests.e2e.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
TARGET = "tests.client.warm_targets:main"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def _warm_process(state_dir: Path) -> Iterator[Path]:
    """A warm process serving the test target on ``<state_dir>/warm-clientapp/clientapp.sock``."""
    path = warm_socket_path(state_dir)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
            f"from client.warm_clientapp import serve; serve(Path({str(path)!r}), modules=(), target={TARGET!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        wait_for("the warm process's socket", lambda: path.exists() or proc.poll() is not None, 30, 0.05)
        assert proc.poll() is None, f"the warm process exited with {proc.returncode}"
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert not path.exists(), "the warm process leaves no socket behind"


@pytest.fixture()
def warm(tmp_path: Path) -> Iterator[Path]:
    """A warm process serving the test target in ``<tmp>/state``."""
    with _warm_process(tmp_path / "state") as path:
        yield path


def test_socket_and_folder_are_closed_to_others(warm: Path) -> None:
    assert stat.S_IMODE(warm.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(warm.stat().st_mode) == 0o600
    assert socket_problem(warm) is None


def test_child_gets_argv_env_cwd_and_fds_and_its_exit_status_comes_back(warm: Path, tmp_path: Path) -> None:
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(os.devnull, "rb") as stdin, out.open("wb") as stdout, err.open("wb") as stderr:
        status = launch(warm, ["exit", "3"], env={"WARM_TEST": "from-launcher"}, cwd=str(tmp_path),
                        fds=(stdin.fileno(), stdout.fileno(), stderr.fileno()))
    assert status == 3
    assert out.read_text() == f"argv=['exit', '3'] env=from-launcher cwd={tmp_path}\n"
    assert err.read_text() == "to stderr\n"


def test_a_child_killed_by_a_signal_and_an_uncaught_exception(warm: Path, tmp_path: Path) -> None:
    with (tmp_path / "err.txt").open("wb") as stderr:
        fds = (0, stderr.fileno(), stderr.fileno())
        assert launch(warm, ["kill"], fds=fds) == 128 + signal.SIGKILL
        assert launch(warm, ["raise"], fds=fds) == 1
    assert "RuntimeError: boom in the task" in (tmp_path / "err.txt").read_text()


def _launcher(warm: Path, pidfile: Path) -> tuple[subprocess.Popen, int]:
    """The installed ``flwr-clientapp`` script (the site's, pointed at ``warm``) running the sleeping task."""
    script = install_launcher(pidfile.parent / "bin", warm)
    proc = subprocess.Popen([str(script), "sleep", str(pidfile)], stdout=subprocess.DEVNULL)
    wait_for("the task's pid file", lambda: pidfile.exists() and pidfile.read_text(), 30, 0.05)
    return proc, int(pidfile.read_text())


def test_a_killed_launcher_gets_its_child_killed(warm: Path, tmp_path: Path) -> None:
    launcher, child = _launcher(warm, tmp_path / "task.pid")
    assert child != launcher.pid and _alive(child)
    launcher.kill()
    launcher.wait(timeout=10)
    wait_for(f"the task (pid {child}) to be killed", lambda: not _alive(child), 10, 0.05)


def test_sigterm_to_the_launcher_reaches_the_child_and_its_status_comes_back(warm: Path, tmp_path: Path) -> None:
    launcher, child = _launcher(warm, tmp_path / "task.pid")
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=10) == 128 + signal.SIGTERM
    assert not _alive(child)


def test_fallback_when_the_warm_process_is_absent(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    absent = warm_socket_path(tmp_path / "state")
    assert launch(absent, ["exit", "0"]) is None
    assert "running the ClientApp in this process" in caplog.text
    # launcher_main then runs Flower's own flwr-clientapp (with the bundle check) in this process
    assert launcher_main(absent, ["--help"]) == 0
    assert "Run a Flower ClientApp" in capsys.readouterr().out


def test_fallback_when_the_socket_is_open_to_others_or_nobody_answers(warm: Path, tmp_path: Path) -> None:
    warm.chmod(0o666)
    try:
        assert "mode 666" in (socket_problem(warm) or "")
        assert launch(warm, ["exit", "0"]) is None
    finally:
        warm.chmod(0o600)
    # a socket nobody accepts on: the launcher gives up after its timeout instead of hanging
    silent = warm_socket_path(tmp_path / "silent")
    silent.parent.mkdir(parents=True, mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(silent))
        silent.chmod(0o600)
        listener.listen(1)
        started = time.monotonic()
        assert launch(silent, ["exit", "0"], ack_timeout_s=0.5) is None
        assert time.monotonic() - started < 5


def test_serve_refuses_an_open_folder_and_a_second_warm_process(warm: Path, tmp_path: Path) -> None:
    open_dir = tmp_path / "open" / "warm-clientapp"
    open_dir.mkdir(parents=True, mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(WarmSocketError, match="mode 755"):
        serve(open_dir / "clientapp.sock", modules=())
    with pytest.raises(WarmSocketError, match="another one listens"):
        serve(warm, modules=())


@pytest.mark.skipif(os.getuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="connecting as another user needs root and a Python that user may run")
def test_another_user_is_refused() -> None:
    top = Path(tempfile.mkdtemp(prefix="warm-uid-"))  # /tmp, not pytest's 0700 folder: the other user must reach it
    try:
        top.chmod(0o711)
        with _warm_process(top / "state") as warm:
            for folder in (top / "state", warm.parent):
                folder.chmod(0o711)
            warm.chmod(0o666)
            code = (f"import socket, struct; s = socket.socket(socket.AF_UNIX); s.connect({str(warm)!r})\n"
                    "try:\n    socket.send_fds(s, [struct.pack('!I', 2)], [0, 1, 2]); s.sendall(b'{}')\n"
                    "    print(repr(s.recv(100)))\nexcept OSError as e:\n    print('closed', e)\n")
            res = subprocess.run(["/usr/bin/python3", "-c", code], user=65534, capture_output=True, text=True,
                                 timeout=30, cwd="/")
            warm.parent.chmod(0o700)
            warm.chmod(0o600)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert res.returncode == 0, res.stderr
    answer = res.stdout.strip()
    assert answer == "b''" or answer.startswith("closed"), f"another user got an answer: {answer}"


def test_the_launcher_is_light_and_the_warm_process_preloads_no_site_module() -> None:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import client.warm_clientapp as w; "
            "assert not {'torch', 'flwr', 'numpy'} & set(sys.modules), 'the launcher imports a heavy module'; "
            "w.preload(); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('client', 'lungmae_core', 'server', 'lungmae_cli'))); "
            "print(all(m in sys.modules for m in ('torch', 'flwr.supernode.runtime.run_clientapp')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["['client', 'client.warm_clientapp']", "True"]
