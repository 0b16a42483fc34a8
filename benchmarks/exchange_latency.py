"""Seconds a deployment exchange adds over the compute: real SuperLink + 1 SuperNode on 127.0.0.1.

For each mode, starts ``flower-superlink --insecure`` and one SuperNode through this project's site launcher
(``python -m client.supernode``, as `lungmae site start` runs it: app bundle check included), submits a tiny
app with ``flwr run``, whose ServerApp sends N ``query`` messages one after another and times each round
trip; the ClientApp imports torch at module level (as ours does, through its privacy code) and times its own
compute (a 64x64 matmul). Overhead = round trip - compute. Modes:

* ``flower``: Flower 1.42's defaults, as before the warm launcher (fresh ``flwr-clientapp`` per message,
  SuperExec task poll 1 s, SuperNode pause 3 s after an empty pull);
* ``cold``: `lungmae site start --no-warm-clientapp` (fresh process per message, poll 0.1 s, pause 0.5 s);
* ``warm``: `lungmae site start` (children forked from the warm ClientApp process, poll 0.1 s, pause 0.5 s).

The coordinator side adds its own wait: Flower's grid (``flwr/superlink/grid/http_grid.py``) sleeps 3 s
between polls for replies, so with it every exchange costs at least ~3 s whatever the site does.
``--grid-poll-s 0.1`` (the default) caps that pause in this benchmark's ServerApp to isolate the site side;
``--grid-poll-s 0`` keeps Flower's 3 s.

Usage:
    python benchmarks/exchange_latency.py [--exchanges 5] [--modes flower cold warm] [--json out.json]

Prints one line per mode (median and mean overhead per exchange, median compute) with the load average
before and after: on a shared machine the figures scale with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loopback import free_port, listening, stop, wait_for, wait_run  # noqa: E402  (this folder, beside the script)

BIN = Path(sys.executable).parent

PYPROJECT = """\
[project]
name = "exchangebench"
version = "1.0.0"
license = "Apache-2.0"
dependencies = ["flwr>=1.42.0"]

[tool.flwr.app]
publisher = "lungmae"

[tool.flwr.app.components]
serverapp = "exchangebench_server:app"
clientapp = "exchangebench_client:app"

[tool.flwr.app.config]
exchanges = 5
out = ""
grid-poll-s = 0.0
"""

CLIENT = '''\
"""Benchmark ClientApp: torch imported at module level, like the project's ClientApp; times its compute."""
import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    x = torch.randn(64, 64)
    float((x @ x).sum())
    return Message(RecordDict({"metrics": MetricRecord({"compute-s": time.perf_counter() - started})}),
                   reply_to=msg)
'''

SERVER = '''\
"""Benchmark ServerApp: N query round trips to the one SuperNode, each timed; the figures go to run config `out`."""
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from lungmae_core.atomic import atomic_write_json  # the benchmark reads the figures back: never half-written

app = ServerApp()


class _CappedSleep:
    """The grid's ``time`` module with sleeps capped: Flower's grid waits 3 s between polls for replies."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


@app.main()
def main(grid: Grid, context: Context) -> None:
    poll = float(context.run_config["grid-poll-s"])
    if poll > 0:
        from flwr.superlink.grid import http_grid

        http_grid.time = _CappedSleep(poll)
    deadline = time.monotonic() + 120
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    rows = []
    for i in range(int(context.run_config["exchanges"])):
        started = time.perf_counter()
        msg = Message(RecordDict({"config": ConfigRecord({"i": i})}), dst_node_id=nodes[0], message_type="query")
        replies = list(grid.send_and_receive([msg], timeout=900))
        wall = time.perf_counter() - started
        if not replies or replies[0].has_error():
            raise RuntimeError(f"exchange {i} failed: {replies[0].error if replies else 'no reply'}")
        rows.append({"wall-s": wall, "compute-s": float(replies[0].content["metrics"]["compute-s"])})
    atomic_write_json(Path(str(context.run_config["out"])), rows)
'''

MODES = {  # mode -> (warm ClientApp process, SuperNode idle pause s, SuperExec task poll s)
    "flower": (False, 3.0, 1.0),
    "cold": (False, 0.5, 0.1),
    "warm": (True, 0.5, 0.1),
}








def write_app(directory: Path) -> str:
    """Write the benchmark app; returns its bundle's sha256 (what the site's trust: fab-sha256 allows)."""
    from flwr.cli.build import build_fab_from_disk

    from lungmae_core.signing import fab_sha256

    directory.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(PYPROJECT)
    (directory / "exchangebench_client.py").write_text(CLIENT)
    (directory / "exchangebench_server.py").write_text(SERVER)
    return fab_sha256(build_fab_from_disk(directory))


def run_mode(mode: str, exchanges: int, work: Path, app: Path, digest: str, grid_poll_s: float) -> dict[str, Any]:
    """One SuperLink + one SuperNode in ``mode``; returns the per-exchange figures."""
    import yaml

    from client.warm_clientapp import warm_socket_path

    warm, idle_s, poll_s = MODES[mode]
    home = work / f"{mode}-{grid_poll_s:g}"
    (home / "flwr").mkdir(parents=True)
    port = free_port()
    (home / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    site = home / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "bench", "state-dir": str(home / "state")},
                                    "data": {"cache": str(home / "cache")}, "trust": {"fab-sha256": [digest]}}))
    env = dict(os.environ, FLWR_HOME=str(home / "flwr"), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(poll_s),
               PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = (home / f"{name}.log").open("w")
        logs.append(log)
        proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"])
        wait_for("the SuperLink", lambda: listening(port), 120, procs)
        sock = warm_socket_path(home / "state")
        launcher = [sys.executable, "-m", "client.supernode", "--site-config", str(site), "--idle-pull-s", str(idle_s)]
        if warm:
            launcher += ["--warm-socket", str(sock)]
        started = time.monotonic()
        start("supernode", [*launcher, "--", str(BIN / "flower-supernode"), "--insecure", "--superlink",
                            f"127.0.0.1:{port}", "--port", str(free_port())])
        preload_s = None
        if warm:  # measure exchanges once the warm process is ready, not its start-up
            wait_for("the warm ClientApp process", sock.exists, 300, procs)
            preload_s = time.monotonic() - started
        out = home / "exchanges.json"
        res = subprocess.run([str(BIN / "flwr"), "run", str(app), "bench", "--format", "json", "--run-config",
                              f"exchanges={exchanges} out='{out}' grid-poll-s={grid_poll_s}"],
                             env=env, cwd=home, capture_output=True,
                             text=True, timeout=300, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout}{res.stderr}")
        run_id = json.loads(res.stdout)["run-id"]
        status = wait_run(lambda *a: subprocess.run([str(BIN / "flwr"), *a], env=env, cwd=home, capture_output=True,
                                                    text=True, timeout=120, check=False),
                          run_id, 120 + 60 * exchanges)
        if status != "finished:completed" or not out.exists():
            tail = (home / "supernode.log").read_text()[-3000:]
            raise RuntimeError(f"mode {mode}: run {run_id} ended as {status!r}; SuperNode log:\n{tail}")
        rows = json.loads(out.read_text())
    finally:
        stop(procs, logs)
    overhead = [r["wall-s"] - r["compute-s"] for r in rows]
    return {"mode": mode, "exchanges": len(rows), "overhead-median-s": statistics.median(overhead),
            "overhead-mean-s": statistics.fmean(overhead), "overhead-s": overhead,
            "compute-median-s": statistics.median(r["compute-s"] for r in rows), "warm-ready-s": preload_s}


def main(argv: list[str] | None = None) -> int:
    """Run every mode and print the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=5, help="query round trips per mode (5)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["flower", "cold", "warm"])
    parser.add_argument("--grid-poll-s", type=float, default=0.1,
                        help="the ServerApp's pause between polls for replies (Flower's grid: 3 s; 0: Flower's). "
                             "0.1 (default) measures the site side alone")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="lungmae-xbench-") as tmp:
        work = Path(tmp)
        digest = write_app(work / "app")
        for mode in args.modes:
            load_before = os.getloadavg()[0]
            result = run_mode(mode, args.exchanges, work, work / "app", digest, args.grid_poll_s)
            result["grid-poll-s"] = args.grid_poll_s
            result["loadavg-before"], result["loadavg-after"] = load_before, os.getloadavg()[0]
            results.append(result)
            print(f"{mode:>6}: {result['exchanges']} exchanges, overhead per exchange median "
                  f"{result['overhead-median-s']:.2f} s, mean {result['overhead-mean-s']:.2f} s (compute median "
                  f"{result['compute-median-s'] * 1000:.1f} ms"
                  + (f"; warm process ready {result['warm-ready-s']:.1f} s after start" if result["warm-ready-s"]
                     else "")
                  + f"); loadavg {load_before:.1f} -> {result['loadavg-after']:.1f}", flush=True)
    grid = f"{args.grid_poll_s:g} s" if args.grid_poll_s > 0 else "Flower's 3 s"
    print(f"target: <= 2 s per exchange over the compute; ServerApp reply poll {grid}; {os.cpu_count()} CPUs")
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
