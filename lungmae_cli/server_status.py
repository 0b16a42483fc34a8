"""`lungmae server status --config federation.yaml`: sites, phase, round and metrics of the federation, at a glance.

Reads the run directory (``state.json``: last complete round; ``metrics.jsonl``: per-round records;
``audit.jsonl``: joins, rejections; ``flwr-run.json``: the run `lungmae server run` follows) and asks the
SuperLink for the registered sites and the run's status (``flwr supernode list`` / ``flwr list``). Works
with the SuperLink down too (it says so). ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae server status`."""
    parser.add_argument("--config", type=Path, required=True, help="the coordinator's federation.yaml")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--offline", action="store_true", help="do not ask the SuperLink (run directory only)")


def _last_jsonl(path: Path) -> dict[str, Any] | None:
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
    return None


def collect_status(config: Path, *, offline: bool = False) -> dict[str, Any]:
    """Everything `server status` shows, as a dict (also used by tests and the runbook's scripts)."""
    from lungmae_cli._process import flower_env
    from lungmae_core.atomic import read_json_object
    from lungmae_core.errors import LungMAEError
    from server.audit import read_audit_log
    from server.federation_config import load_federation_config
    from server.ops.run_control import RUN_RECORD, FlwrCLI, FlwrCLIError

    cfg = load_federation_config(config)
    run_dir = cfg.run_dir
    status: dict[str, Any] = {"run_dir": str(run_dir), "superlink": cfg.server.superlink}
    status["checkpoint"] = read_json_object(run_dir / "state.json")
    last = _last_jsonl(run_dir / "metrics.jsonl")
    if last is not None:
        status["last_round"] = {
            "phase": last.get("phase"), "round": last.get("round"), "phase_round": last.get("phase_round"),
            "phase_rounds": last.get("phase_rounds"), "duration_s": last.get("duration_s"),
            "train": last.get("train", {}).get("aggregated"), "evaluate": last.get("evaluate", {}).get("aggregated"),
            "participation": last.get("participation"), "bytes": last.get("bytes")}
    summary = read_json_object(run_dir / "metrics.json")
    if summary is not None:
        status["run_status"] = summary.get("status")
        status["final"] = summary.get("final")
    audit_path = run_dir / "audit.jsonl"
    if audit_path.exists():
        records = read_audit_log(audit_path)
        status["audit"] = {
            "events": len(records),
            "updates_rejected": sum(1 for r in records if r.get("event") == "update-rejected"),
            "last": [{k: r.get(k) for k in ("ts", "event", "phase", "server_round", "site", "status")
                      if r.get(k) is not None} for r in records[-5:]],
        }
    record = read_json_object(run_dir / RUN_RECORD)
    status["flwr_run"] = record
    if not offline:
        from server.ops.superlink import LOOPBACK, ServerTLS, split_address, write_connection

        try:
            tls = ServerTLS.from_section(cfg.server, base_dir=Path(config).resolve().parent)
            # the Control API is on the SuperLink's loopback port only (sites use the proxy)
            write_connection(f"{LOOPBACK}:{split_address(cfg.server.superlink)[1]}", tls.root_certificates)
        except LungMAEError as exc:
            status["superlink_error"] = str(exc).splitlines()[0]
            status["superlink_reachable"] = False
            return status
        cli = FlwrCLI(env=flower_env(), timeout_s=30)
        try:
            nodes = cli.nodes()
            status["sites"] = None if nodes is None else [
                {"node_id": n.get("node-id"), "status": n.get("status"), "online_at": n.get("online-at")}
                for n in nodes]
            if record and nodes is not None:
                run = cli.run_status(int(record["run_id"]))
                status["flwr_run_status"] = None if run is None else {
                    k: run.get(k) for k in ("status", "status-details", "elapsed", "network-traffic")}
        except FlwrCLIError as exc:
            status["superlink_error"] = str(exc)
        status["superlink_reachable"] = status.get("sites") is not None
    return status


def _print_text(s: dict[str, Any]) -> None:
    print(f"run directory  {s['run_dir']}")
    if "superlink_reachable" in s:
        if s["superlink_reachable"]:
            sites = s.get("sites") or []
            online = sum(1 for n in sites if n.get("status") == "online")
            print(f"SuperLink      {s['superlink']}: reachable; sites registered {len(sites)}, online {online}")
            for n in sites:
                print(f"  node {n['node_id']}: {n['status']}")
        else:
            print(f"SuperLink      {s['superlink']}: UNREACHABLE {s.get('superlink_error', '')}".rstrip())
    run = s.get("flwr_run_status")
    if s.get("flwr_run"):
        state = (f"{run['status']} {run.get('status-details') or ''}".strip() if run else
                 "not asked (--offline)" if "superlink_reachable" not in s else "unknown (SuperLink unreachable)")
        print(f"run            {s['flwr_run']['run_id']}: {state}")
    ckpt = s.get("checkpoint")
    print("checkpoint     " + (f"phase {ckpt.get('phase')} round {ckpt.get('server_round')} (step "
                                f"{ckpt.get('step_index')}) at {ckpt.get('saved_at')}" if ckpt else "none yet"))
    last = s.get("last_round")
    if last:
        part = last.get("participation") or {}
        print(f"last round     {last['phase']} {last.get('phase_round')}/{last.get('phase_rounds')} in "
              f"{last.get('duration_s')} s; sampled {len(part.get('sampled', []))}, replied "
              f"{len(part.get('replied', []))}, failed {len(part.get('failed', []))}, rejected "
              f"{len(part.get('rejected', []))}")
        for kind in ("train", "evaluate"):
            values = {k: v for k, v in (last.get(kind) or {}).items() if isinstance(v, int | float)}
            if values:
                print(f"  {kind:<9}    " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    if s.get("run_status"):
        print(f"status         {s['run_status']}")
    audit = s.get("audit")
    if audit:
        print(f"audit          {audit['events']} events, {audit['updates_rejected']} updates rejected; latest:")
        for r in audit["last"]:
            print("  " + " ".join(f"{k}={v}" for k, v in r.items()))


def run(args: argparse.Namespace) -> int:
    """Print the status; exit 0 (1 when the SuperLink was asked and is unreachable)."""
    s = collect_status(args.config, offline=args.offline)
    if args.json:
        print(json.dumps(s, indent=1, default=str))
    else:
        _print_text(s)
    return 0 if s.get("superlink_reachable", True) else 1
