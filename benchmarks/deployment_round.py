"""Seconds a deployment round of OUR run adds over the sites' compute: real processes on 127.0.0.1.

`benchmarks/exchange_latency.py` times one query exchange of a toy app, so it isolates the site side. This
benchmark runs the project's own app, as a coordinator runs it: ``flower-superlink``, one SuperNode per site
started the way `lungmae site start` starts it (the site launcher, bundle check and warm ClientApp process;
insecure loopback here, TLS costs one handshake per connection), and ``flwr run .`` with a small federation
(a tiny model on 32^3 cubes, ``--rounds`` pretraining and ``--rounds`` fine-tuning rounds, no evaluation
rounds). Each round the ServerApp sends the global model to every site, each site trains and replies, and
the ServerApp validates and aggregates the replies (server/replies.py, server/strategy.py).

From the run's ``metrics.jsonl`` it reads, per round, the server's wall time of the round (``duration_s``:
from sending the instructions to the aggregated model) and each site's reported training seconds
(``train.sites.<site>.train_seconds``: reading the site's training split, the privacy gate and the local
training loop). Overhead of a round = duration - the slowest site's training seconds: the wire both ways,
the polls, the ClientApp's work around the training (building the model, loading the global weights,
packing the update) and the server's checks and aggregation. The server's wait for the sites' answer to
its query before the first round (their first exchange with the run: once per run) is split off with the audit
log's round-started events and printed apart; the first round of each phase still builds that phase's model at
the sites. Median and mean over rounds are the figures.

Usage:
    python benchmarks/deployment_round.py [--sites 2] [--rounds 4] [--json out.json]

Prints the per-round overhead (median, mean, max) beside the 2 s target, with the load average before and
after (on a shared machine the figures scale with the load).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loopback import free_port, listening, stop, wait_for, wait_run  # noqa: E402  (this folder, beside the script)

BIN = Path(sys.executable).parent
TARGET_S = 2.0

FEDERATION = """\
model: {{name: tiny, overrides: {{img-size: 32, depth: 2, decoder-depth: 1}}}}
phases:
  pretrain: {{rounds: {rounds}, local-epochs: 1, min-sites: {sites}, evaluate-every: 0}}
  finetune: {{rounds: {rounds}, local-epochs: 1, min-sites: {sites}, evaluate-every: 0}}
round-timeout-s: 300
"""








def make_sites(root: Path, sites: int, digest: str) -> list[Path]:
    """Small prepared synthetic hospitals that trust this checkout's app bundle; their site.yaml paths."""
    import dataclasses

    from client.prepare import prepare_site
    from client.site_config import load_site_config, write_site_config
    from lungmae_cli.synth import write_synthetic_sites

    paths = write_synthetic_sites(root, sites=sites, scans_per_site=6, seed=0, shape=(40, 64, 64),
                                  preprocess_size=32, workers=1)
    for path in paths:
        cfg = load_site_config(path)
        cfg = dataclasses.replace(cfg, trust=dataclasses.replace(cfg.trust, fab_sha256=(digest,)))
        write_site_config(cfg, path)
        prepare_site(load_site_config(path), workers=1, progress=False)
    return [Path(p) for p in paths]


def snapshot(dest: Path) -> Path:
    """Copy the checkout's files that git does not ignore (what ``flwr run .`` bundles) to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def round_overheads(metrics_jsonl: Path, audit_jsonl: Path) -> list[dict[str, Any]]:
    """Per training round: server wall seconds, the wait for sites before it, training seconds, overhead.

    A round record's ``duration_s`` runs from the server asking for able sites to the aggregated model; the
    audit log's ``round-started`` (after that query) and ``round-finished`` events split it into the wait for
    the sites' answer to the query and the round proper. Before the first round of a run that wait is the
    sites' first exchange with the run (once per run, not per round); later it is a no-op. The overhead of a
    round is the round proper minus the slowest site's training seconds.
    """
    marks: dict[tuple[str, int], float] = {}
    for line in audit_jsonl.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") in ("round-started", "round-finished"):
            ts = datetime.datetime.fromisoformat(event["ts"]).timestamp()
            marks[(event["event"], int(event["server_round"]))] = ts
    rows = []
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        sites = record["train"]["sites"]
        if record.get("skipped") or not sites:
            continue
        compute = max(float(m["train_seconds"]) for m in sites.values())
        n = int(record["round"])
        if ("round-started", n) not in marks or ("round-finished", n) not in marks:
            raise RuntimeError(f"{audit_jsonl} has no round-started/round-finished events for round {n}")
        proper = marks[("round-finished", n)] - marks[("round-started", n)]
        rows.append({"phase": record["phase"], "round": record["phase_round"], "duration-s": record["duration_s"],
                     "wait-for-sites-s": round(max(0.0, record["duration_s"] - proper), 3),
                     "round-s": round(proper, 3), "compute-s": round(compute, 3),
                     "overhead-s": round(proper - compute, 3), "sites": len(sites)})
    return rows


def run(sites: int, rounds: int, work: Path, supernode_args: Sequence[str] = ()) -> dict[str, Any]:
    """One federation of ``sites`` SuperNodes for ``rounds`` + ``rounds`` rounds; the per-round figures."""
    from flwr.cli.build import build_fab_from_disk

    from client.site_config import load_site_config
    from client.warm_clientapp import warm_socket_path
    from lungmae_cli._process import flower_env
    from lungmae_core.signing import fab_sha256

    # The app is a snapshot of this checkout, so an edit made while the benchmark runs changes neither the
    # bundle the sites trust nor the one `flwr run` submits.
    app = snapshot(work / "app")
    digest = fab_sha256(build_fab_from_disk(app))
    site_paths = make_sites(work / "sites", sites, digest)
    home = work / "flwr"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = flower_env(dict(os.environ, FLWR_HOME=str(home), LUNGMAE_CLIENT_THREADS="1",
                          FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
                          PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
                          PYTHONPATH=os.pathsep.join(p for p in (str(app), os.environ.get("PYTHONPATH", "")) if p)))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, cmd: list[str]) -> None:
        log = (work / f"{name}.log").open("w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def flwr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=app, capture_output=True, text=True,
                              timeout=120, check=False)

    fed = work / "federation.yaml"
    fed.write_text(FEDERATION.format(rounds=rounds, sites=sites))
    run_dir = work / "run"
    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"])
        wait_for("the SuperLink", lambda: listening(port), 120, procs)
        sockets = []
        for i, path in enumerate(site_paths):
            sock = warm_socket_path(load_site_config(path).site.state_dir)
            sockets.append(sock)
            start(f"site{i}", [sys.executable, "-m", "client.supernode", "--site-config", str(path), *supernode_args,
                               "--warm-socket", str(sock), "--", str(BIN / "flower-supernode"), "--insecure",
                               "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                               "--node-config", f'site-config="{path}"'])
        wait_for("every site's warm ClientApp process", lambda: all(s.exists() for s in sockets), 300, procs)
        started = time.monotonic()
        res = flwr("run", ".", "bench", "--format", "json", "--run-config",
                   f"federation-config='{fed}' run-dir='{run_dir}'")
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout}{res.stderr}")
        run_id = json.loads(res.stdout)["run-id"]
        status = wait_run(flwr, run_id, 300 + 120 * rounds)
        wall = time.monotonic() - started
        if status != "finished:completed":
            tail = (work / "site0.log").read_text()[-3000:]
            raise RuntimeError(f"run {run_id} ended as {status!r}; site0's log:\n{tail}")
    finally:
        stop(procs, logs)
    rows = round_overheads(run_dir / "metrics.jsonl", run_dir / "audit.jsonl")
    if len(rows) != 2 * rounds:
        raise RuntimeError(f"expected {2 * rounds} training rounds in {run_dir / 'metrics.jsonl'}, found {len(rows)}")
    overhead = [r["overhead-s"] for r in rows]
    return {"sites": sites, "rounds": rows, "first-wait-for-sites-s": rows[0]["wait-for-sites-s"],
            "overhead-median-s": statistics.median(overhead),
            "overhead-mean-s": statistics.fmean(overhead), "overhead-max-s": max(overhead),
            "compute-median-s": statistics.median(r["compute-s"] for r in rows), "run-wall-s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the federation once and print the per-round overhead beside the target."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2, help="SuperNodes, one per synthetic site (2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per phase, pretraining and fine-tuning (4)")
    parser.add_argument("--idle-pull-s", type=float, default=None,
                        help="the sites' SuperNode pause after an empty pull (default: client.supernode's own)")
    parser.add_argument("--local-wait-s", type=float, default=None,
                        help="the sites' SuperNode pause between looks for a reply (default: client.supernode's own)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this (new or empty) folder and keep it: the processes' logs, the run directory")
    args = parser.parse_args(argv)
    if args.sites < 1 or args.rounds < 1:
        parser.error("--sites and --rounds must be at least 1")
    supernode_args = [f"--{name.replace('_', '-')}={value}" for name, value in
                      (("idle_pull_s", args.idle_pull_s), ("local_wait_s", args.local_wait_s)) if value is not None]
    load_before = os.getloadavg()
    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.sites, args.rounds, args.keep.resolve(), supernode_args)
    else:
        with tempfile.TemporaryDirectory(prefix="lungmae-roundbench-") as tmp:
            result = run(args.sites, args.rounds, Path(tmp), supernode_args)
    result["loadavg-before"], result["loadavg-after"] = list(load_before), list(os.getloadavg())
    for r in result["rounds"]:
        wait = f" after {r['wait-for-sites-s']:.2f} s waiting for the sites" if r["wait-for-sites-s"] >= 0.05 else ""
        print(f"{r['phase']:>9} round {r['round']}: {r['round-s']:.2f} s{wait}, slowest site's training "
              f"{r['compute-s']:.2f} s, overhead {r['overhead-s']:.2f} s")
    print(f"{args.sites} sites: overhead per round median {result['overhead-median-s']:.2f} s, mean "
          f"{result['overhead-mean-s']:.2f} s, max {result['overhead-max-s']:.2f} s (training median "
          f"{result['compute-median-s']:.2f} s; whole run {result['run-wall-s']:.0f} s, of which "
          f"{result['first-wait-for-sites-s']:.2f} s waiting for the sites' first answer); target <= {TARGET_S:g} s; "
          f"loadavg {load_before[0]:.1f} -> {result['loadavg-after'][0]:.1f}; {os.cpu_count()} CPUs")
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
