"""What the warm ClientApp process's children run in tests/client/test_warm_clientapp.py (``serve(target=...)``).

``main(["exit", "3"])`` prints its argv and ``$WARM_TEST`` to stdout, a line to stderr, and exits 3;
``main(["sleep", PIDFILE])`` writes its pid to PIDFILE and sleeps; ``main(["kill"])`` dies of SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    """Act as told by ``argv`` (see the module docstring)."""
    what = argv[0]
    if what == "exit":
        print(f"argv={argv} env={os.environ.get('WARM_TEST')} cwd={os.getcwd()}")
        print("to stderr", file=sys.stderr)
        raise SystemExit(int(argv[1]))
    if what == "sleep":
        Path(argv[1]).write_text(str(os.getpid()))
        time.sleep(60)
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "raise":
        raise RuntimeError("boom in the task")
