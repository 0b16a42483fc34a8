"""`lungmae server start --config federation.yaml`: run the coordinator's Flower SuperLink until stopped.

TLS with the consortium certificate, SuperNode authentication (only registered site keys may join), a
persistent state database (registrations and runs survive restarts) and no runtime dependency
installation. It also writes the `lungmae` connection into ``$FLWR_HOME/config.toml`` so that
`flwr supernode register ... lungmae`, `lungmae server run` and `lungmae server status` reach it.

Least exposure: the SuperLink binds 127.0.0.1 (its one port serves Fleet, Control and ServerAppIo); the
sites reach it through nginx with mutual TLS that forwards only the Fleet routes (``--proxy-listen`` runs that
nginx in the foreground beside it; or install ``lungmae server proxy-config`` in the system's nginx). The
SuperLink runs in ``process`` isolation with a SuperExec secret, and the ``flower-superexec`` that launches
the ServerApp is started here with the same secret. SIGTERM / Ctrl-C stop all of them.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae server start`."""
    parser.add_argument("--config", type=Path, required=True, help="the coordinator's federation.yaml")
    parser.add_argument("--database", type=Path, default=None,
                        help="SuperLink state database (sites, runs). Default: <run-dir>/superlink.db")
    parser.add_argument("--listen", default=None, metavar="HOST",
                        help="address the SuperLink binds (default 127.0.0.1: sites come through the proxy; "
                             "another address exposes the Control and ServerAppIo APIs to that network)")
    parser.add_argument("--proxy-listen", default=None, metavar="HOST:PORT",
                        help="also run nginx in the foreground on this public address (mutual TLS, Fleet only)")
    parser.add_argument("--crl", type=Path, default=None,
                        help="the CA's revocation list for the proxy. Default: crl.pem beside root-certificates")
    parser.add_argument("--audit-key", type=Path, default=None,
                        help="Ed25519 key that signs checkpoint lines of the audit log. Default: "
                             "audit-signing.key beside the server certificate, if present")
    parser.add_argument("--log-file", type=Path, default=None, help="also write the SuperLink log to this file")
    parser.add_argument("--print-command", action="store_true", help="print the flower-superlink command and exit")


def run(args: argparse.Namespace) -> int:
    """Build the SuperLink, SuperExec (and proxy) commands from federation.yaml and run them."""
    import os
    import shlex
    import sys

    from lungmae_cli._process import flower_env, run_forwarding_signals
    from server.audit import AUDIT_KEY_ENV
    from server.federation_config import load_federation_config
    from server.ops.superlink import (
        CONNECTION_NAME,
        LOOPBACK,
        SUPERLINK_ADVICE,
        ServerTLS,
        ensure_superexec_secret,
        split_address,
        superexec_command,
        superlink_command,
        write_connection,
    )

    cfg = load_federation_config(args.config)
    tls = ServerTLS.from_section(cfg.server, base_dir=args.config.resolve().parent)
    database = args.database or cfg.run_dir / "superlink.db"
    state_dir = database.resolve().parent
    secret = state_dir / "superexec.secret"
    cmd = superlink_command(cfg.server.superlink, tls, database=database, listen_host=args.listen,
                            log_file=args.log_file, superexec_secret=secret)
    _, port = split_address(cfg.server.superlink)
    if args.print_command:
        print(shlex.join(cmd))
        print(shlex.join(superexec_command(cfg.server.superlink, tls, secret_file=secret)))
        return 0
    ensure_superexec_secret(secret)
    if args.listen not in (None, LOOPBACK, "localhost", "::1"):
        print(f"lungmae: warning: the SuperLink binds {args.listen}: its Control API (flwr run, registration) and "
              "ServerAppIo API are reachable from that network too; use --proxy-listen instead", file=sys.stderr)
    env = flower_env()
    audit_key = args.audit_key or tls.certificate.parent / "audit-signing.key"
    if audit_key.is_file():
        env[AUDIT_KEY_ENV] = str(audit_key.resolve())
    elif args.audit_key is not None:
        from lungmae_core.errors import FederationConfigError

        raise FederationConfigError(f"--audit-key {audit_key} does not exist; make it with `lungmae certs --out pki`")
    extras = [("SuperExec", superexec_command(cfg.server.superlink, tls, secret_file=secret,
                                              parent_pid=os.getpid()))]
    if args.proxy_listen:
        extras.append(("proxy", _proxy_command(args, tls, port, state_dir / "proxy")))
    config_toml = write_connection(f"{LOOPBACK}:{port}", tls.root_certificates)
    metrics = (f"http://127.0.0.1:{cfg.server.metrics_port}/metrics while a run is active"
               if cfg.server.metrics_port else "off (set server: metrics-port)")
    proxy = f"; sites connect to the proxy on {args.proxy_listen} (mutual TLS)" if args.proxy_listen else ""
    print(f"lungmae: SuperLink on {args.listen or LOOPBACK}:{port} (TLS, node authentication, SuperExec secret "
          f"{secret}, state {database}){proxy}; audit signing "
          f"{env.get(AUDIT_KEY_ENV, 'off (no audit-signing.key)')}; connection '{CONNECTION_NAME}' written to "
          f"{config_toml}; metrics {metrics}", flush=True)
    children = _start_extras(extras, env)
    try:
        return run_forwarding_signals(cmd, env, SUPERLINK_ADVICE, name="SuperLink")
    finally:
        _stop(children)


def _proxy_command(args: argparse.Namespace, tls: object, port: int, workdir: Path) -> list[str]:
    """Write the standalone nginx.conf for ``--proxy-listen`` under ``workdir``; returns the nginx command."""
    import shutil

    from lungmae_core.atomic import atomic_write_text
    from lungmae_core.errors import FederationConfigError
    from server.ops.proxy import render_site_block, render_standalone

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise FederationConfigError("Unable to run the proxy as nginx is not installed (apt-get install nginx)")
    crl = args.crl or Path(tls.root_certificates).parent / "crl.pem"  # type: ignore[attr-defined]
    block = render_site_block(listen=args.proxy_listen, upstream_port=port, tls=tls, crl=crl)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    atomic_write_text(conf, render_standalone(block, workdir))
    # -e: the error log from the first line on (nginx otherwise tries its packaged path, unwritable as a user)
    return [nginx, "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")]


def _start_extras(extras: list[tuple[str, list[str]]], env: dict[str, str]) -> list[tuple[str, subprocess.Popen]]:
    """Start the processes that live beside the SuperLink (SuperExec, proxy); they die with us."""
    from lungmae_cli._process import _die_with_parent

    children = []
    for name, cmd in extras:
        try:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        except FileNotFoundError:
            _stop(children)
            from lungmae_core.errors import LungMAEError

            raise LungMAEError(f"Unable to start the {name} as `{cmd[0]}` is not installed") from None
        children.append((name, proc))
    return children


def _stop(children: list[tuple[str, subprocess.Popen]]) -> None:
    """SIGTERM each child, then SIGKILL what is still there after 15 s."""
    for _, proc in children:
        if proc.poll() is None:
            proc.terminate()
    for _, proc in children:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
