"""Wall time of `lungmae experiment --quick` against its 60-minute target on 2 CPU cores, with its endpoint.

Usage::

    python benchmarks/experiment.py                        # quick profile, fresh output folder
    python benchmarks/experiment.py --profile tiny         # a smoke run (minutes)
    python benchmarks/experiment.py --cores 0,1 --json exp.json   # pin to two cores (the target box)
    python benchmarks/experiment.py -- --threads 1         # a shared, oversubscribed machine (see below)

Runs the real command in a subprocess, then reads its experiment.json and prints one line: wall seconds
beside the reference (3600 s for quick), the primary endpoint (federated MAE -> fine-tune minus federated
scratch, balanced accuracy at k=8, 95% CI), both baselines at k=8 beside chance (0.25), and the load
average at start and end (a shared machine inflates the time; quote figures from a quiet one). Under a load
average well above the core count, torch's two intra-op threads spin on each other: an MAE step measured
3.5 s with two threads and 0.13 s with one (load 16), so pass ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_S = {"quick": 3600.0, "tiny": 600.0, "gpu": 3600.0}
CHANCE = 0.25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=sorted(REFERENCE_S))
    parser.add_argument("--cores", default="", help="taskset CPU list, e.g. 0,1 (default: no pinning)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("extra", nargs="*", help="extra `lungmae experiment` arguments (after --)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-experiment-"))
    cmd = [sys.executable, "-m", "lungmae_cli.main", "experiment", "--profile", args.profile, "--out", str(out),
           *args.extra]
    if args.cores:
        cmd = ["taskset", "-c", args.cores, *cmd]
    load_start = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"lungmae experiment failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    record = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    ep = record["endpoint"]
    k8 = {arm: record["arms"][arm].get("8", {}).get("balanced_accuracy") for arm in
          ("baseline-histogram", "baseline-zone-texture") if arm in record["arms"]}
    summary = {"profile": args.profile, "wall_s": round(wall, 1), "reference_s": REFERENCE_S[args.profile],
               "endpoint": ep.get("difference"), "endpoint_ci": ep.get("ci"), "baselines_k8": k8,
               "chance": CHANCE, "load_start": [round(v, 2) for v in load_start],
               "load_end": [round(v, 2) for v in os.getloadavg()], "out": str(out)}
    print(f"experiment {args.profile}: {wall:.0f} s (reference {REFERENCE_S[args.profile]:.0f} s); endpoint "
          f"{summary['endpoint']} CI {summary['endpoint_ci']}; baselines at k=8 {k8} (chance {CHANCE}); "
          f"load {summary['load_start']} -> {summary['load_end']}")
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
