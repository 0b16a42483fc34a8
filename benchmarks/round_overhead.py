"""What each ClientApp exchange costs before any training: fresh-process imports and Flower's polling.

Usage::

    python benchmarks/round_overhead.py                 # 3 repeats of each import, median
    python benchmarks/round_overhead.py --repeats 5 --json overhead.json

Flower 1.42 runs every message a site receives (query, train, evaluate) in a new ``flwr-clientapp``
process that SuperExec starts, so each exchange pays: SuperNode's idle poll of the SuperLink (a fixed
``time.sleep(3)`` between empty pulls: 1.5 s on average), SuperExec's task poll (``FLWR_SUPEREXEC_TASK_POLL_
INTERVAL``, default 1 s: 0.5 s on average), the process start with Flower's runtime imports, the ClientApp
module's imports, and ``import torch`` for any message that trains or evaluates. This benchmark measures the
import parts in fresh interpreters (``python -c``; the median of ``--repeats``) and reads the two poll
intervals from the installed Flower source, then prints the per-exchange budget beside the 2 s target.
It also reports whether importing the ClientApp module already imports torch (the query message needs
none; today ``client.privacy_gate`` -> ``lungmae_core.privacy`` imports it at module level).
"""

from __future__ import annotations

import argparse
import inspect
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 2.0
PROBES = {
    "python": "pass",
    "flwr clientapp runtime": "import flwr.supernode.runtime.run_clientapp",
    "client.client_app (ours)": "import client.client_app",
    "torch": "import torch",
    "train path (torch + lungmae_core.train + opacus)": "import lungmae_core.train, opacus",
}


def _time(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flower_poll_intervals() -> dict[str, float]:
    """The SuperNode's idle sleep and SuperExec's default task poll, read from the installed Flower."""
    import flwr.supercore.superexec.run_superexec as superexec
    import flwr.supernode.start_client_internal as supernode

    source = inspect.getsource(supernode.start_client_internal)
    sleeps = [float(x) for x in re.findall(r"time\.sleep\(([0-9.]+)\)", source)]
    return {"supernode idle poll (s)": max(sleeps) if sleeps else float("nan"),
            "superexec task poll (s)": float(superexec._DEFAULT_TASK_POLL_INTERVAL_SECONDS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[:3]
    base = _time(PROBES["python"], args.repeats)
    record: dict[str, float] = {"python start (s)": base}
    for name, code in PROBES.items():
        if name != "python":
            record[f"{name} import (s)"] = _time(code, args.repeats) - base
    probe = subprocess.run([sys.executable, "-c", "import sys, client.client_app; print('torch' in sys.modules)"],
                           check=True, cwd=ROOT, capture_output=True, text=True)
    record["client_app module imports torch"] = float(probe.stdout.strip() == "True")
    polls = flower_poll_intervals()
    record.update(polls)
    waits = polls["supernode idle poll (s)"] / 2 + polls["superexec task poll (s)"] / 2
    train_exchange = base + record["flwr clientapp runtime import (s)"] + \
        record["train path (torch + lungmae_core.train + opacus) import (s)"] + waits
    record["expected overhead per train/evaluate exchange (s)"] = train_exchange
    print(f"loadavg {load}; fresh-process import times (median of {args.repeats}, minus bare python start)")
    for k, v in record.items():
        print(f"  {k:<58} {v:6.2f}")
    print(f"per train/evaluate exchange: ~{train_exchange:.1f} s before training (target {TARGET_S:.0f} s per round)")
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, {"loadavg": load, **record})
    return 0


if __name__ == "__main__":
    sys.exit(main())
