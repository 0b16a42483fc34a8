"""Peak ServerApp memory of one training round with 2, 5, 10 and 20 simulated sites, on the real server path.

Usage::

    python benchmarks/server_memory.py                                  # tiny and paper-p16, fedavg
    python benchmarks/server_memory.py --configs tiny --sites 2 5 10 20 --methods fedavg median
    python benchmarks/server_memory.py --modes stream send-and-receive --json server_memory.json
    python benchmarks/server_memory.py --configs paper-p16 --modes stream --allocator fixed-mmap glibc-default

Each measurement runs in a fresh child process (so the peak resident set is its own): it imports torch,
Flower and the server, builds the global model's state dict (the server holds it all round), registers
N sites, then runs ``server.strategy.PhaseStrategy.train_round`` (the ServerApp's round: pack and send the
model, collect, validate every reply, aggregate, apply) on a benchmark grid whose sites answer with an
fp16-packed random update (as ``lungmae_core.wire.pack_state`` makes it, bundled in one ``ArrayRecord``, as
a SuperLink hands it over). The reply is made when it is pulled, as it would arrive over the wire, so the
only replies in memory are those the server holds.

* ``stream``: the grid supports ``push_messages``/``pull_messages`` (Flower's simulation and deployment
  grids do): the strategy pulls one reply at a time, validates it, folds it into the running sum and drops
  it (``server.strategy.iter_replies`` + ``server.streaming_aggregation.StreamingAggregator``);
* ``send-and-receive``: the grid only has ``send_and_receive`` (the fallback): every reply is held until
  the last arrives, then each is validated and folded in;
* ``hold``: the previous server (for reference): every reply held, every update decoded into a list, then
  ``server.aggregation.aggregate_updates`` on the list.

Printed per config, method, mode and number of sites: the peak RSS above the RSS right after the imports
(so it counts the global model, the message sent, the replies, the decoded updates and the accumulators)
as a multiple of the model's fp32 size. The target is "<= 2x model + one update", flat in the number of
sites: global (1x) + running sum (1x) + one update as received (fp16, 0.5x) = 2.5x; the server decodes the
update a tensor at a time (``server.update_checks.ValidatedUpdate``), so no decoded copy is added.
Each child first fixes glibc's mmap threshold as the ServerApp does (``server/process_memory.py``);
``--allocator glibc-default`` leaves glibc's sliding threshold, for comparison in the same run.
Runs that would hold more than ``--max-hold-gib`` of replies are skipped (``hold`` grows by 1.5 model sizes
per site, ``send-and-receive`` by 0.5).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = (2, 5, 10, 20)
ALLOCATORS = ("fixed-mmap", "glibc-default")
CONFIGS = ("tiny", "paper-p16")
MODES = ("stream", "send-and-receive", "hold")
#: replies held per site by each mode, in model sizes (for --max-hold-gib)
HELD = {"stream": 0.0, "send-and-receive": 0.5, "hold": 1.5}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reply_record(global_state, seed: int):
    """Site ``seed``'s fp16-packed update as one bundle ArrayRecord, filled part by part, tensor by tensor.

    The parts follow the packing rule of ``lungmae_core.bundle.bundle`` (``part_spans``), and each part is
    serialised before the next is filled, so making a reply holds no fp32 model copy and no packed dict
    beside it; the server's own checks (``unbundle``) reject the reply if this ever drifts from the format.
    """
    import json

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from lungmae_core.bundle import part_name, part_spans

    rng = np.random.default_rng(seed)
    entries = [[k, list(v.shape), "float16" if v.is_floating_point() else str(v.numpy().dtype)]
               for k, v in global_state.items()]
    spans, parts = part_spans(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in entries)
    record = ArrayRecord(array_dict={"layout": Array(np.frombuffer(json.dumps(entries).encode(), np.uint8).copy())})
    for index, length in enumerate(parts):
        payload = np.zeros(length, np.uint8)
        for (k, shape, _), (where, start) in zip(entries, spans, strict=True):
            if where != index:
                continue
            v = global_state[k]
            value = ((rng.standard_normal(tuple(shape), np.float32) * 1e-4).astype(np.float16)
                     if v.is_floating_point() else np.ascontiguousarray(v.numpy()))
            payload[start:start + value.nbytes] = value.reshape(-1).view(np.uint8)
        record[part_name(index)] = Array(payload)
        del payload
    return record


def _bench_grid(global_state, sites: int, push_pull: bool):
    """A Grid whose N sites answer a train message with a random fp16 update when the reply is pulled."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid

    from lungmae_core.contract import RoundConfig, TrainReply

    class BenchGrid(Grid):
        def __init__(self) -> None:
            self.pending: dict[str, Message] = {}
            self._run = None
            self.next_id = 0

        def set_run(self, run) -> None:
            self._run = run

        @property
        def run(self):
            return self._run

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

        def get_node_ids(self):
            return [101 + i for i in range(sites)]

        def _answer(self, msg: Message) -> Message:
            cfg = RoundConfig.decode(dict(msg.content["config"]))
            node = msg.metadata.dst_node_id
            meta = TrainReply(server_round=cfg.server_round, num_examples=10 + node % 7, epsilon=0.0,
                              train_seconds=1.0, update_bytes=0, loss=1.0)
            reply = Message(RecordDict({"arrays": _reply_record(global_state, node),
                                        "metrics": MetricRecord(meta.encode())}), reply_to=msg)
            del msg
            reply.metadata.__dict__["_src_node_id"] = node
            return reply

        def push_messages(self, messages):
            if not push_pull:
                raise NotImplementedError("this grid has only send_and_receive")
            ids = []
            for msg in messages:
                self.next_id += 1
                msg.metadata.__dict__["_message_id"] = f"m{self.next_id}"
                # a SuperLink in another process keeps the message, not the ServerApp: only what the reply
                # needs is kept here, so the sent model is not counted as server memory
                light = Message(RecordDict({"config": msg.content["config"]}), dst_node_id=msg.metadata.dst_node_id,
                                message_type=msg.metadata.message_type)
                light.metadata.__dict__["_message_id"] = msg.metadata.message_id
                self.pending[msg.metadata.message_id] = light
                ids.append(msg.metadata.message_id)
            return ids

        def pull_messages(self, message_ids):
            if not push_pull:
                raise NotImplementedError("this grid has only send_and_receive")
            return [self._answer(self.pending.pop(m)) for m in message_ids if m in self.pending]

        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for msg in messages:
                self.next_id += 1
                msg.metadata.__dict__["_message_id"] = f"m{self.next_id}"
                out.append(self._answer(msg))
            return out

    return BenchGrid()


def child(config: str, sites: int, mode: str, method: str, spool: str, allocator: str) -> dict:
    """One measurement in this (fresh) process; returns the record."""
    import time

    import torch
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from lungmae_core.contract import RoundConfig, TrainReply
    from lungmae_core.model import build_mae
    from lungmae_core.wire import pack_state, state_nbytes, unpack_state
    from server.aggregation import aggregate_updates
    from server.process_memory import return_large_frees_to_os
    from server.replies import arrays_to_state, state_to_arrays
    from server.sites import SiteInfo, SiteRegistry
    from server.strategy import PhaseStrategy

    # instruction messages need a run id; a ServerApp process gets it from its runtime, this one sets it
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    torch.set_num_threads(1)
    if allocator == "fixed-mmap":
        return_large_frees_to_os()  # as the ServerApp does when it starts a run
    base_kib = _kib("VmRSS")
    global_state = {k: v.detach().clone() for k, v in build_mae(config, seed=0).state_dict().items()}
    model_bytes = state_nbytes(global_state)
    registry = SiteRegistry()
    for i in range(sites):
        registry.sites[101 + i] = SiteInfo(node_id=101 + i, name=f"site-{i}", verified=True, num_unlabelled=100)
    cfg = RoundConfig(phase="pretrain", server_round=1, model_name=config, model_config={"name": config},
                      compression="fp16", phase_rounds=1)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    t0 = time.perf_counter()
    if mode == "hold":  # the previous server: every reply, then every decoded update, in a list
        grid = _bench_grid(global_state, sites, push_pull=False)
        down = RecordDict({"arrays": state_to_arrays(pack_state(global_state, "fp16")),
                           "config": ConfigRecord(cfg.encode())})
        msgs = [grid.create_message(down, "train", 101 + i, "") for i in range(sites)]
        replies = list(grid.send_and_receive(msgs))
        updates = [unpack_state(arrays_to_state(r.content["arrays"])) for r in replies]
        weights = [float(TrainReply.decode(dict(r.content["metrics"])).num_examples) for r in replies]
        result = aggregate_updates(updates, weights, method)
        assert set(result) == set(global_state)
        aggregated = len(updates)
    else:
        grid = _bench_grid(global_state, sites, push_pull=mode == "stream")
        strategy = PhaseStrategy(cfg, registry, method=method, max_norm=1e9, max_site_share=1.0,
                                 spool_dir=spool)
        new, report = strategy.train_round(grid, global_state, cfg, timeout=600)
        assert new is not None and set(new) == set(global_state), report.rejected[:2]
        aggregated = len(report.replied)
    assert aggregated == sites
    seconds = time.perf_counter() - t0
    peak_kib = _kib("VmHWM")
    return {"config": config, "sites": sites, "mode": mode, "method": method, "allocator": allocator,
            "model_bytes": model_bytes,
            "peak_above_imports_bytes": (peak_kib - base_kib) * 1024, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--sites", nargs="+", type=int, default=list(SITES))
    parser.add_argument("--methods", nargs="+", default=["fedavg"],
                        choices=["fedavg", "fedprox", "trimmed-mean", "median"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--max-hold-gib", type=float, default=4.0,
                        help="skip hold-everything runs whose updates alone would exceed this")
    parser.add_argument("--allocator", nargs="+", default=["fixed-mmap"], choices=list(ALLOCATORS),
                        help="fixed-mmap: glibc's mmap threshold fixed at 1 MiB, as the ServerApp sets it "
                             "(server/process_memory.py); glibc-default: its sliding threshold, for reference")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=6, metavar=("CONFIG", "SITES", "MODE", "METHOD", "SPOOL", "ALLOCATOR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        config, sites, mode, method, spool, allocator = args.child
        print(json.dumps(child(config, int(sites), mode, method, spool, allocator)))
        return 0
    from lungmae_core.model import build_mae

    records = []
    print(f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}; peak RSS of one train_round above the "
          f"imports, as a multiple of the fp32 model (target <= 2.5x = global + running sum + one fp16 reply, "
          f"flat in sites)")
    for config in args.configs:
        model_bytes = 4 * sum(p.numel() for p in build_mae(config).state_dict().values())
        for method in args.methods:
            for mode, allocator in [(m, a) for m in args.modes for a in args.allocator]:
                for sites in args.sites:
                    need = HELD[mode] * sites * model_bytes
                    if need > args.max_hold_gib * 2 ** 30:
                        print(f"{config:>9} {method:<12} {mode:<16} {allocator:<13} {sites:>2} sites: skipped "
                              f"(would hold "
                              f"{need / 2 ** 30:.1f} GiB > --max-hold-gib {args.max_hold_gib})")
                        continue
                    with tempfile.TemporaryDirectory(prefix="server-memory-") as spool:
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", config, str(sites), mode, method, spool,
                             allocator],
                            check=True, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
                    rec = json.loads(out.stdout.strip().splitlines()[-1])
                    records.append(rec)
                    ratio = rec["peak_above_imports_bytes"] / rec["model_bytes"]
                    print(f"{config:>9} {method:<12} {mode:<16} {allocator:<13} {sites:>2} sites: peak "
                          f"{rec['peak_above_imports_bytes'] / 2 ** 20:8.1f} MiB = {ratio:5.2f}x model "
                          f"({rec['model_bytes'] / 2 ** 20:.1f} MiB), {rec['seconds']:.1f} s", flush=True)
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, {"records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
