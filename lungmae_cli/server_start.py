"""`lungmae server start --config federation.yaml`: run the coordinator's Flower SuperLink until stopped.

TLS with the consortium certificate, SuperNode authentication (only registered site keys may join), a
persistent state database (registrations and runs survive restarts) and no runtime dependency
installation. It also writes the `lungmae` connection into ``$FLWR_HOME/config.toml`` so that
`flwr supernode register ... lungmae`, `lungmae server run` and `lungmae server status` reach it.
SIGTERM / Ctrl-C stop it cleanly.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae server start`."""
    parser.add_argument("--config", type=Path, required=True, help="the coordinator's federation.yaml")
    parser.add_argument("--database", type=Path, default=None,
                        help="SuperLink state database (sites, runs). Default: <run-dir>/superlink.db")
    parser.add_argument("--listen", default=None, metavar="HOST",
                        help="address to bind (default: the host of server: superlink; 0.0.0.0 = all interfaces)")
    parser.add_argument("--log-file", type=Path, default=None, help="also write the SuperLink log to this file")
    parser.add_argument("--print-command", action="store_true", help="print the flower-superlink command and exit")


def run(args: argparse.Namespace) -> int:
    """Build the SuperLink command from federation.yaml and run it, forwarding signals."""
    import shlex

    from lungmae_cli._process import flower_env, run_forwarding_signals
    from server.federation_config import load_federation_config
    from server.superlink import CONNECTION_NAME, SUPERLINK_ADVICE, ServerTLS, superlink_command, write_connection

    cfg = load_federation_config(args.config)
    tls = ServerTLS.from_section(cfg.server, base_dir=args.config.resolve().parent)
    database = args.database or cfg.run_dir / "superlink.db"
    cmd = superlink_command(cfg.server.superlink, tls, database=database, listen_host=args.listen,
                            log_file=args.log_file)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    config_toml = write_connection(cfg.server.superlink, tls.root_certificates)
    metrics = (f"http://127.0.0.1:{cfg.server.metrics_port}/metrics while a run is active"
               if cfg.server.metrics_port else "off (set server: metrics-port)")
    print(f"lungmae: SuperLink on {cfg.server.superlink} (TLS, node authentication, state {database}); "
          f"connection '{CONNECTION_NAME}' written to {config_toml}; metrics {metrics}", flush=True)
    return run_forwarding_signals(cmd, flower_env(), SUPERLINK_ADVICE, name="SuperLink")
