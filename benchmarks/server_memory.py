"""Peak server memory while aggregating 2, 5, 10 and 20 simulated site updates, streaming vs hold-everything.

Usage::

    python benchmarks/server_memory.py                                  # tiny and paper-p16, fedavg
    python benchmarks/server_memory.py --configs tiny --sites 2 5 10 20 --methods fedavg median
    python benchmarks/server_memory.py --max-hold-gib 4 --json server_memory.json

Each measurement runs in a fresh child process (so the peak resident set is its own): it imports torch,
builds the global model's state dict (the server holds it all round), then receives one fp16-packed update
per site, as ``lungmae_core.wire.pack_state`` would deliver it (made tensor by tensor, so the simulated
site adds no model-sized temporary), and aggregates:

* ``hold``: what ``server.strategy`` does today: every reply kept, every update decoded into a list, then
  ``server.aggregation.aggregate_updates``;
* ``stream``: ``server.streaming_aggregation.StreamingAggregator``: each reply decoded, added, dropped.

Printed per config, method, mode and number of sites: the peak RSS above the RSS right after ``import
torch`` (so it counts the global model, the replies, the decoded updates and the accumulators) as a
multiple of the model's fp32 size. The target is "<= 2x model + one update" and flat in the number of
sites: global (1x) + accumulator (1x) + one update as received (fp16, 0.5x) and decoded (1x) = 3.5x.
``hold`` runs that would need more than
``--max-hold-gib`` are skipped (they grow by 1.5 model sizes per site: 20 paper-size sites are ~14 GiB).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = (2, 5, 10, 20)
CONFIGS = ("tiny", "paper-p16")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(config: str, sites: int, mode: str, method: str, spool: str) -> dict:
    """One measurement in this (fresh) process; returns the record."""
    import numpy as np
    import torch

    from lungmae_core.model import build_mae
    from lungmae_core.wire import pack_state, state_nbytes, unpack_state
    from server.aggregation import aggregate_updates
    from server.streaming_aggregation import StreamingAggregator

    torch.set_num_threads(1)
    base_kib = _kib("VmRSS")
    global_state = {k: v.detach().clone() for k, v in build_mae(config, seed=0).state_dict().items()}
    model_bytes = state_nbytes(global_state)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before_kib = _kib("VmRSS")

    def reply(i: int) -> dict[str, np.ndarray]:
        """What arrives from site i: an fp16-packed update, made tensor by tensor (no fp32 model copy)."""
        rng = np.random.default_rng(i)
        return {k: (pack_state({k: rng.standard_normal(tuple(v.shape), np.float32) * 1e-3}, "fp16")[k]
                    if v.is_floating_point() else v.numpy()) for k, v in global_state.items()}

    weights = [10 + i for i in range(sites)]
    if mode == "hold":
        replies = [reply(i) for i in range(sites)]
        updates = [unpack_state(r) for r in replies]
        result = aggregate_updates(updates, weights, method)
    else:
        with StreamingAggregator(method, spool_dir=spool) as agg:
            for i in range(sites):
                update = unpack_state(reply(i))
                agg.add(update, weights[i])
                del update
            result = agg.result()
    assert set(result) == set(global_state)
    peak_kib = _kib("VmHWM")
    return {"config": config, "sites": sites, "mode": mode, "method": method, "model_bytes": model_bytes,
            "peak_above_torch_bytes": (peak_kib - base_kib) * 1024,
            "peak_above_global_bytes": (peak_kib - before_kib) * 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--sites", nargs="+", type=int, default=list(SITES))
    parser.add_argument("--methods", nargs="+", default=["fedavg"],
                        choices=["fedavg", "fedprox", "trimmed-mean", "median"])
    parser.add_argument("--modes", nargs="+", default=["stream", "hold"], choices=["stream", "hold"])
    parser.add_argument("--max-hold-gib", type=float, default=4.0,
                        help="skip hold-everything runs whose updates alone would exceed this")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=5, metavar=("CONFIG", "SITES", "MODE", "METHOD", "SPOOL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        config, sites, mode, method, spool = args.child
        print(json.dumps(child(config, int(sites), mode, method, spool)))
        return 0
    from lungmae_core.model import build_mae

    records = []
    print(f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}; peak RSS above 'import torch', "
          f"as a multiple of the fp32 model (target <= 3.5x = global + accumulator + one fp16 reply + its "
          f"decoded update, flat in sites)")
    for config in args.configs:
        model_bytes = 4 * sum(p.numel() for p in build_mae(config).state_dict().values())
        for method in args.methods:
            for mode in args.modes:
                for sites in args.sites:
                    need = 1.5 * sites * model_bytes
                    if mode == "hold" and need > args.max_hold_gib * 2 ** 30:
                        print(f"{config:>9} {method:<12} {mode:<6} {sites:>2} sites: skipped (would hold "
                              f"{need / 2 ** 30:.1f} GiB > --max-hold-gib {args.max_hold_gib})")
                        continue
                    with tempfile.TemporaryDirectory(prefix="server-memory-") as spool:
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", config, str(sites), mode, method, spool],
                            check=True, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
                    rec = json.loads(out.stdout.strip().splitlines()[-1])
                    records.append(rec)
                    ratio = rec["peak_above_torch_bytes"] / rec["model_bytes"]
                    print(f"{config:>9} {method:<12} {mode:<6} {sites:>2} sites: peak "
                          f"{rec['peak_above_torch_bytes'] / 2 ** 20:8.1f} MiB = {ratio:5.2f}x model "
                          f"({rec['model_bytes'] / 2 ** 20:.1f} MiB)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"records": records}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
