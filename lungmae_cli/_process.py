"""Run a long-lived Flower process (SuperLink, SuperNode) under `lungmae`: relay its log, forward signals,
and turn Flower's exit codes into advice IT can act on.

Flower processes exit with status 1 for every error and print ``Exit Code: NNN`` in their log; this module
watches for that line so `lungmae site start` / `lungmae server start` can end with one clear sentence.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TextIO

__all__ = ["FLOWER_ENV_DEFAULTS", "flower_env", "run_forwarding_signals"]

logger = logging.getLogger(__name__)

# Telemetry and the update check phone home: a hospital firewall blocks them, and nobody agreed to them.
FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
_EXIT_RE = re.compile(r"Exit Code: (\d+)")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def flower_env(base: Mapping[str, str] | None = None, telemetry: bool = False) -> dict[str, str]:
    """The environment for a Flower process: ``base`` (default: ours) with telemetry and update check off.

    The directory of this Python's scripts is put first on ``PATH``, so ``flower-superlink``, ``flwr`` and
    the helpers Flower starts by name are found even when the virtual environment is not activated (systemd
    units, ``.venv/bin/python -m pytest``).
    """
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)
    if scripts not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (scripts, env.get("PATH", "")) if p)
    for key, value in FLOWER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env["FLWR_TELEMETRY_ENABLED"] = "1" if telemetry else "0"
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when `lungmae` dies, so a killed wrapper never leaves an
    orphaned SuperLink/SuperNode holding its port (Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_forwarding_signals(
    cmd: Sequence[str],
    env: Mapping[str, str],
    advice: Mapping[int, str],
    *,
    name: str,
    out: TextIO | None = None,
    retry_codes: Collection[int] = (),
    retry_for_s: float = 0.0,
    retry_every_s: float = 10.0,
    retry_note: str = "",
) -> int:
    """Run ``cmd`` until it exits, relaying its output line by line and forwarding termination signals.

    When the process reports one of ``retry_codes`` (e.g. a SuperNode refused because the SuperLink still
    counts its previous, crashed connection as online), it is started again every ``retry_every_s`` seconds
    until ``retry_for_s`` seconds have passed since the first start.

    The child runs in its own session (a Ctrl-C reaches it once, through us) and is killed if we die.
    Flower's helper processes (``flower-superexec``) inherit the output pipe and outlive the child by a few
    seconds, so the relay runs in a thread and we return as soon as the child itself has exited.

    Args:
        cmd: the command (``flower-superlink ...``).
        env: its environment.
        advice: Flower exit code -> sentence printed when the process reports that code.
        name: what to call the process in messages (``"SuperNode"``).
        out: where to relay the output. Defaults to ``sys.stdout``.
        retry_codes / retry_for_s / retry_every_s / retry_note: see above; ``retry_note`` says why in the
            message printed before each retry.

    Returns:
        The process's exit status; 0 after a clean stop by signal.
    """
    import time

    started = time.monotonic()
    while True:
        status, code, stopped = _run_once(cmd, env, name=name, out=out)
        if (code in retry_codes and not stopped
                and time.monotonic() - started + retry_every_s <= retry_for_s):
            print(f"lungmae: the {name} stopped with Flower exit code {code}; retrying in {retry_every_s:g} s "
                  f"({retry_note})", file=sys.stderr, flush=True)
            time.sleep(retry_every_s)
            continue
        break
    if code is not None:
        hint = advice.get(code, f"see https://flower.ai/docs/framework/ref-exit-codes/{code}.html")
        print(f"lungmae: error: the {name} stopped with Flower exit code {code}: {hint}", file=sys.stderr)
        return status or 1
    return status


def _run_once(cmd: Sequence[str], env: Mapping[str, str], *, name: str,
              out: TextIO | None) -> tuple[int, int | None, bool]:
    """One run of ``cmd``; returns ``(exit status, last Flower exit code or None, stopped on request)``."""
    out = sys.stdout if out is None else out
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
    except FileNotFoundError:
        print(f"lungmae: error: Unable to start the {name} as `{cmd[0]}` is not installed in this environment; "
              "install the project (pip install lungmae-fl) or use the container image", file=sys.stderr)
        return 127, None, False
    codes: list[int] = []
    port_in_use = threading.Event()
    stopping = threading.Event()

    def _relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            match = _EXIT_RE.search(line)
            if match:
                codes.append(int(match.group(1)))
            if "address already in use" in line.lower():
                port_in_use.set()

    def _forward(signum: int, _frame: object) -> None:
        stopping.set()
        try:
            proc.send_signal(signum if signum != signal.SIGHUP else signal.SIGTERM)
        except ProcessLookupError:
            pass

    relay = threading.Thread(target=_relay, name=f"{name}-log", daemon=True)
    relay.start()
    previous = {sig: signal.signal(sig, _forward) for sig in _FORWARDED}
    try:
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    relay.join(timeout=3)
    if codes:
        return status, codes[-1], stopping.is_set()
    if port_in_use.is_set():
        print(f"lungmae: error: the {name} could not bind its port as another process uses it (an older "
              f"{name} still running?); stop it or change the port in the config", file=sys.stderr)
        return status or 1, None, False
    if stopping.is_set():
        print(f"lungmae: the {name} stopped on request", file=sys.stderr)
        return 0, None, True
    if status != 0:
        print(f"lungmae: error: the {name} exited with status {status}; see its log above", file=sys.stderr)
    return status, None, False
