"""`lungmae certs`: make the consortium CA, the SuperLink's TLS certificate and per-site authentication keys.

Run it at the coordinator once (``--server-name``/``--server-ip``: every name and address sites use to reach
it), and again with ``--site NAME`` to add hospitals; existing files are kept. Each hospital may instead make
its own key with ``lungmae certs --out DIR --site NAME`` and send only the ``.pub`` file to the coordinator.
It prints the ``flwr supernode register`` command the coordinator runs for each site.

It also issues each ``--site`` a TLS client certificate for the coordinator's mutual-TLS proxy, keeps the
CA's revocation list fresh (``ca/crl.pem``; ``--revoke SITE`` adds a site's certificate to it), and makes the
consortium's Ed25519 app-signing key (``signing/fab-signing.key``; sites trust ``fab-signing.pub``) and the
server's audit-signing key (``server/audit-signing.key``).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae certs`."""
    parser.add_argument("--out", type=Path, required=True, help="directory for ca/, server/ and sites/")
    parser.add_argument("--server-name", action="append", default=[], metavar="DNS",
                        help="DNS name of the coordinator as sites reach it (repeat; e.g. fl.consortium.org); "
                             "localhost and 127.0.0.1 are always added (the ServerApp connects on loopback)")
    parser.add_argument("--server-ip", action="append", default=[], metavar="IP",
                        help="IP address of the coordinator as sites reach it (repeat; e.g. 10.0.0.5)")
    parser.add_argument("--site", action="append", default=[], metavar="NAME",
                        help="make an authentication key for this site (repeat; lower-case, digits, '-')")
    parser.add_argument("--organisation", default="LungMAE-FL consortium", help="CA organisation name")
    parser.add_argument("--days", type=int, default=825, help="server certificate validity in days (825)")
    parser.add_argument("--renew-server", action="store_true",
                        help="reissue the server certificate even if one exists (e.g. to add a name)")
    parser.add_argument("--revoke", action="append", default=[], metavar="SITE",
                        help="revoke this site's TLS client certificate (repeat); then reload the proxy "
                             "(nginx -s reload). Its node key should also be unregistered")
    parser.add_argument("--connection", default="lungmae",
                        help="Flower connection name used in the printed register commands (lungmae)")


def run(args: argparse.Namespace) -> int:
    """Make what is missing under ``--out`` and print the register command per site."""
    from client.node_key import make_site_key
    from lungmae_core.atomic import atomic_write_bytes
    from lungmae_core.signing import make_signing_key
    from server.ops.certs import (
        CertificateError,
        certificate_summary,
        make_ca,
        make_client_certificate,
        make_server_certificate,
        revoke,
        write_crl,
    )

    out: Path = args.out
    if len(set(args.site)) != len(args.site):
        raise CertificateError(f"--site names must be unique; got {args.site}")
    ca_key, ca_crt = make_ca(out / "ca", args.organisation)
    print(f"CA certificate   {ca_crt}  (give to every site; keep {ca_key} offline)")
    if args.server_name or args.server_ip:
        # The SuperLink's own ServerApp and the coordinator's CLI reach it on the loopback address, over TLS
        # too: the certificate must always name localhost and 127.0.0.1 as well.
        names = list(dict.fromkeys([*args.server_name, "localhost"]))
        ips = list(dict.fromkeys([*args.server_ip, "127.0.0.1"]))
        key, crt = make_server_certificate(out / "server", ca_key, ca_crt, names=names, ips=ips, days=args.days,
                                           overwrite=args.renew_server)
        info = certificate_summary(crt)
        print(f"server cert      {crt}  key {key}")
        print(f"                 names: {', '.join(map(str, info['sans']))}; valid until {info['not_after']}")
    sign_key, sign_pub = make_signing_key(out / "signing", "fab-signing")
    print(f"app signing key  {sign_key}  (keep offline; `lungmae server run --signing-key`); sites trust {sign_pub}")
    if (out / "server").is_dir():
        audit_key, _ = make_signing_key(out / "server", "audit-signing")
        print(f"audit signing    {audit_key}  (`lungmae server start` signs checkpoint lines of the audit log)")
    registered = []
    for site in args.site:
        key, pub = make_site_key(out / "sites" / site, site)
        atomic_write_bytes(out / "sites" / site / "ca.crt", ca_crt.read_bytes(), 0o644)
        atomic_write_bytes(out / "sites" / site / "fab-signing.pub", sign_pub.read_bytes(), 0o644)
        tls_key, tls_crt = make_client_certificate(out / "sites" / site, site, ca_key, ca_crt)
        print(f"site {site:<12} private key {key} (give to that site only), public key {pub}")
        print(f"{'':17} TLS client certificate {tls_crt} and key {tls_key} (give to that site only)")
        registered.append((site, pub))
    crl = out / "ca" / "crl.pem"
    for site in args.revoke:
        crt = out / "sites" / site / f"{site}.client.pem"
        if not crt.is_file():
            raise CertificateError(f"Unable to revoke site {site!r} as {crt} does not exist; list the sites under "
                                   f"{out / 'sites'}")
        serial = revoke(ca_key, ca_crt, crl, crt)
        print(f"revoked          {site} (certificate serial {serial:x}); reload the proxy: nginx -s reload")
    if not args.revoke:
        write_crl(ca_key, ca_crt, crl)
    print(f"revocation list  {crl}  (valid 90 days; rerun `lungmae certs --out {out}` to refresh it)")
    if registered:
        print("\nRegister each site at the coordinator (SuperLink running, `lungmae server run` has written the "
              f"'{args.connection}' connection once, or see docs/deployment.md):")
        for site, pub in registered:
            print(f"  flwr supernode register {shlex.quote(str(pub.resolve()))} {shlex.quote(args.connection)} "
                  f"--name {shlex.quote(site)}")
    return 0
