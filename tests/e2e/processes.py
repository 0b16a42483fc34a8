"""Helpers of the real-process tests: free loopback ports, waiting, and finding a test's own processes.

Every process a test starts carries ``LUNGMAE_E2E_TAG=<tag>`` (and optionally ``LUNGMAE_E2E_ROLE``) in its
environment, which every descendant inherits; teardown finds and stops them by that tag, so nothing a test
started outlives it, whatever Flower spawned below it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tagged_pids(tag: str, role: str | None = None) -> list[int]:
    """Processes whose environment carries ``tag`` (and ``role``, when given), this one excluded."""
    want = f"LUNGMAE_E2E_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env and (role is None or f"LUNGMAE_E2E_ROLE={role}".encode() in env):
            pids.append(int(entry.name))
    return pids


def wait_for(what: str, predicate: Callable[[], object], timeout_s: float, poll_s: float = 1.0) -> object:
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stop_groups(procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[IO[bytes]], term_s: float = 20) -> None:
    """Stop processes started with ``start_new_session=True``, last started first, then close their logs.

    Each gets SIGTERM on its whole process group (SuperNodes before the SuperLink they talk to), then up to
    ``term_s`` seconds to exit before SIGKILL: a graceful stop lets Flower end its own children.
    """
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=term_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for log in logs:
        log.close()
