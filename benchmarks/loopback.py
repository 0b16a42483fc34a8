"""Processes on 127.0.0.1 for the deployment benchmarks: a free port, waiting for a condition, stopping them.

`benchmarks/exchange_latency.py` and `benchmarks/deployment_round.py` start ``flower-superlink`` and
SuperNodes in their own process groups; these helpers are what both need around them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

__all__ = ["free_port", "listening", "wait_for", "stop", "wait_run"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float, procs: Sequence[subprocess.Popen[Any]]
             ) -> None:
    """Poll ``predicate`` every 0.2 s until it holds; fail early when one of ``procs`` exits.

    Raises:
        RuntimeError: a process exited while waiting. TimeoutError: ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stop(procs: Sequence[subprocess.Popen[Any]], logs: Sequence[IO[str]] = ()) -> None:
    """SIGTERM each process group (last started first), SIGKILL what is left after 20 s; close the logs."""
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for log in logs:
        log.close()


def wait_run(flwr: Callable[..., subprocess.CompletedProcess[str]], run_id: int, timeout_s: float) -> str:
    """Poll ``flwr list bench --run-id RUN_ID`` each second until the run finished; its last status.

    ``flwr(*args)`` runs the ``flwr`` CLI with the benchmark's environment (``FLWR_HOME`` naming ``bench``).
    """
    status = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not status.startswith("finished"):
        time.sleep(1)
        listing = flwr("list", "bench", "--run-id", str(run_id), "--format", "json")
        runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
        status = runs[0].get("status", "") if runs else ""
    return status
