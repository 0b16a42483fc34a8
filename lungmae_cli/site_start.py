"""`lungmae site start --config site.yaml`: run this hospital's Flower SuperNode until stopped.

It connects out to the coordinator's SuperLink over TLS (consortium CA; with ``trust: client-certificate``
also presenting the site's certificate to the coordinator's proxy), authenticates with the site's
registered key, and runs our ClientApp for each message with the site config path as node config, but only
for app bundles the site's ``trust`` section approves (``client/fab_check.py``), each forked from the site's
warm ClientApp process (``client/warm_clientapp.py``: torch & co. imported once, not once per message;
``--no-warm-clientapp`` turns it off) with the SuperExec polling for tasks every 0.1 s
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, Flower's default 1 s; set it in the environment to override). Flower
telemetry and update checks are off. SIGTERM / Ctrl-C stop the SuperNode cleanly (systemd: `systemctl stop`).
Run `lungmae site preflight --config site.yaml` first: it checks the same things and more, one line each.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae site start`."""
    parser.add_argument("--config", type=Path, required=True, help="the site's site.yaml")
    parser.add_argument("--telemetry", action="store_true", help="allow Flower's anonymous telemetry (off)")
    parser.add_argument("--activation-retry-s", type=float, default=120.0,
                        help="keep retrying this long when the SuperLink refuses activation: after a crash it "
                             "holds the site's previous connection for up to a minute (120; 0: no retry)")
    parser.add_argument("--no-warm-clientapp", action="store_true",
                        help="start a fresh ClientApp process (importing torch & co.) for every message instead of "
                             "forking it from the site's warm ClientApp process (slower; for troubleshooting)")
    parser.add_argument("--print-command", action="store_true",
                        help="print the flower-supernode command and exit (for a custom service manager)")


def run(args: argparse.Namespace) -> int:
    """Build the SuperNode command from site.yaml and run it, forwarding signals."""
    import shlex

    from client.fab_check import FabPolicy
    from client.site_config import load_site_config
    from client.supernode import ACTIVATION_REFUSED, SUPEREXEC_POLL_INTERVAL_S, SUPERNODE_ADVICE, launch_command
    from lungmae_cli._process import flower_env, run_forwarding_signals

    cfg = load_site_config(args.config)
    cmd = launch_command(args.config, cfg, warm=not args.no_warm_clientapp)
    policy = FabPolicy.from_site_config(cfg)  # a broken trusted key is an error now, not at the first message
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    metrics = None
    if cfg.connection.metrics_port:
        from client.site_metrics import SiteMetrics
        from lungmae_core.errors import SiteConfigError

        metrics = SiteMetrics(cfg)
        try:
            metrics.serve(cfg.connection.metrics_port)
        except OSError as exc:
            raise SiteConfigError(f"Unable to serve site metrics on 127.0.0.1:{cfg.connection.metrics_port} as "
                                  f"{exc.strerror or exc}; change connection: metrics-port in {args.config}") from exc
    where = f"; metrics on http://127.0.0.1:{cfg.connection.metrics_port}/metrics" if metrics else ""
    trusted = ", ".join([p.name for p in policy.trusted_keys] + [f"{len(policy.allowed_sha256)} allowed sha256"])
    mtls = ", client certificate" if cfg.trust.client_certificate else ""
    print(f"lungmae: site '{cfg.site.name}' joining the federation at {cfg.connection.superlink} (TLS{mtls}, key "
          f"{cfg.connection.auth_key}){where}; app bundles trusted: {trusted}; site log {policy.audit_log}; "
          "stop with Ctrl-C or SIGTERM", flush=True)
    try:
        if metrics is not None:
            metrics.up = 1
        env = flower_env(telemetry=args.telemetry)
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_INTERVAL_S))
        return run_forwarding_signals(
            cmd, env, SUPERNODE_ADVICE, name="SuperNode",
            retry_codes=(ACTIVATION_REFUSED,), retry_for_s=args.activation_retry_s, retry_every_s=10.0,
            retry_note="the SuperLink may still hold this site's previous connection, or the key is not registered")
    finally:
        if metrics is not None:
            metrics.close()
