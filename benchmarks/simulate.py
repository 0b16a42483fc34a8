"""Wall time of the main job, `lungmae simulate` with its defaults, against its 3-minute target (2 quiet cores).

Usage::

    python benchmarks/simulate.py                         # defaults, fresh workdir, report included
    python benchmarks/simulate.py --cores 0,1 --json sim.json   # pin to two cores (emulate the target box)

Runs the real command in a subprocess (a fresh Ray each time), timestamps every line it prints and splits
the wall time into: data (synthetic DICOM + site prepare, up to "[3/3]"), start (imports, Ray and the
apps, from "[3/3]" to the end of the first round minus that round's own seconds), rounds (the sum of the
per-round seconds the progress lines report), and the rest (hand-off, final evaluation, report, Ray
shutdown). Then it prints one line: total wall seconds beside the 180 s reference, the data part
(synthetic DICOM + site prepare), the final pooled accuracy / balanced accuracy / ROC AUC beside chance
(1 / number of classes; 0.5 for the AUC), and the machine's load
average at the start (a busy machine inflates the time; rerun when idle for a figure to quote).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_S = 180.0  # the main job's target: within 3 minutes on 2 quiet CPU cores (docs/performance.md)
CHANCE = 0.25        # 4 ILD classes


def timeline(stamped: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Split the wall time by the timestamps of the progress lines (see the module docstring)."""
    fed = next((t for t, line in stamped if line.startswith("[3/3]")), None)
    rounds = [(t, float(m.group(1))) for t, line in stamped
              if (m := re.match(r"\s+step \d+/\d+\s+(?:pretrain|finetune).*\s([0-9.]+) s$", line))]
    if fed is None or not rounds:
        return {"total": wall}
    first_end, first_s = rounds[0]
    round_s = sum(s for _, s in rounds)
    start = max(0.0, first_end - first_s - fed)
    return {"data": fed, "start (imports, Ray, apps)": start, "rounds": round_s,
            "between rounds": max(0.0, rounds[-1][0] - first_end - (round_s - first_s)),
            "final evaluation, report, shutdown": wall - rounds[-1][0], "total": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="", help="taskset CPU list, e.g. 0,1 (default: no pinning)")
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("extra", nargs="*", help="extra `lungmae simulate` arguments (after --)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-simulate-"))
    cmd = [str(Path(sys.executable).parent / "lungmae"), "simulate", "--workdir", str(workdir), *args.extra]
    if args.cores:
        cmd = ["taskset", "-c", args.cores, *cmd]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamped: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        stamped.append((time.perf_counter() - t0, line.rstrip("\n")))
    stderr = proc.stderr.read() if proc.stderr is not None else ""
    proc.wait()
    wall = time.perf_counter() - t0
    out = "\n".join(line for _, line in stamped)
    phases = timeline(stamped, wall)
    data = re.search(r"\(data (\d+) s\)", out)
    pooled = re.search(r"accuracy ([0-9.]+), balanced accuracy ([0-9.]+)", out)
    auc = re.search(r"ROC AUC ([0-9.]+)", out)
    record = {"wall_s": round(wall, 1), "reference_s": REFERENCE_S, "data_s": float(data.group(1)) if data else None,
              "accuracy": float(pooled.group(1)) if pooled else None,
              "balanced_accuracy": float(pooled.group(2)) if pooled else None, "chance": CHANCE,
              "roc_auc": float(auc.group(1)) if auc else None,
              "phases_s": phases,
              "returncode": proc.returncode, "load_avg_1m_at_start": round(load, 2), "cores": args.cores or "all",
              "cpu_count": os.cpu_count(), "args": args.extra}
    print(f"lungmae simulate: {wall:.0f} s (reference {REFERENCE_S:.0f} s), data {record['data_s']} s, "
          f"pooled accuracy {record['accuracy']} / balanced {record['balanced_accuracy']} (chance {CHANCE}), "
          f"ROC AUC {record['roc_auc']} (chance 0.5), "
          f"exit {proc.returncode}, load {load:.1f} at start")
    print("  where the time went: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    if proc.returncode != 0:
        print(out[-2000:], stderr[-2000:], sep="\n")
    if args.json is not None:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, record)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
