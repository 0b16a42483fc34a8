"""`lungmae server proxy-config --config federation.yaml --listen 0.0.0.0:9091`: print the nginx config.

The printed ``server {}`` block goes to ``/etc/nginx/conf.d/lungmae-fleet.conf`` on the coordinator: mutual
TLS with the consortium CA and its revocation list, only the Fleet API routes forwarded to the SuperLink's
loopback port (``server/ops/proxy.py``). ``--standalone DIR`` prints a whole nginx.conf instead, for
``nginx -c FILE -p DIR`` in the foreground (what `lungmae server start --proxy-listen` runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae server proxy-config`."""
    parser.add_argument("--config", type=Path, required=True, help="the coordinator's federation.yaml")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="the public address sites connect to (e.g. 0.0.0.0:9091)")
    parser.add_argument("--crl", type=Path, default=None,
                        help="the CA's revocation list. Default: crl.pem beside root-certificates")
    parser.add_argument("--server-name", default="_", help="nginx server_name (default _: any)")
    parser.add_argument("--standalone", type=Path, default=None, metavar="DIR",
                        help="print a complete nginx.conf keeping its pid, logs and temp files in DIR")


def run(args: argparse.Namespace) -> int:
    """Render and print the proxy configuration."""
    from server.federation_config import load_federation_config
    from server.ops.proxy import render_site_block, render_standalone
    from server.ops.superlink import ServerTLS, split_address

    cfg = load_federation_config(args.config)
    tls = ServerTLS.from_section(cfg.server, base_dir=args.config.resolve().parent)
    crl = args.crl or tls.root_certificates.parent / "crl.pem"
    block = render_site_block(listen=args.listen, upstream_port=split_address(cfg.server.superlink)[1], tls=tls,
                              crl=crl, server_name=args.server_name)
    print(render_standalone(block, args.standalone) if args.standalone else block, end="")
    return 0
