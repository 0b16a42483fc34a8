"""The coordinator's reverse proxy: nginx with mutual TLS in front of the SuperLink, forwarding only Fleet.

Flower 1.42's SuperLink serves the Fleet, Control and ServerAppIo APIs on one port, so it binds the loopback
address (``server/ops/superlink.py``) and nginx (Debian package ``nginx``) is the only thing the sites reach:

* TLS with the consortium server certificate, and a client certificate from every caller: one per site,
  issued by the consortium CA (``lungmae certs --site``), checked against the CA's revocation list
  (``lungmae certs --revoke SITE`` then ``nginx -s reload``).
* Only the Fleet routes a SuperNode uses, POST only (the paths of
  ``flwr/superlink/routers/fleet/router.py`` and ``flwr/supernode/fleet_http_client.py``); the Control API
  (``/v1/control/*``) and the Runtime/ServerAppIo API (``/v1/runtime/*``) get 403.
* nginx -> SuperLink is TLS again on loopback, verified with the CA (the SuperLink's certificate names
  ``localhost``).

:func:`render_site_block` gives the ``server {}`` block for ``/etc/nginx/conf.d/`` (the same text as
``deploy/nginx/lungmae-fleet.conf.template`` with the values filled in); :func:`render_standalone` wraps it
in a whole ``nginx.conf`` for a foreground nginx run by an unprivileged user (tests, the one-machine demo).

Examples:
    >>> text = render_site_block(listen="0.0.0.0:9091", upstream_port=9092, tls=tls, crl=Path("pki/ca/crl.pem"))
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from lungmae_core.errors import FederationConfigError

__all__ = ["FLEET_ROUTES", "SITE_BLOCK_TEMPLATE", "render_site_block", "render_standalone"]

#: The Fleet API routes a SuperNode with an authentication key calls (no self-registration).
FLEET_ROUTES = ("activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages", "push-messages",
                "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received")

# The template is deploy/nginx/lungmae-fleet.conf.template verbatim (a test checks), so nginx's one-line
# location regex stays one line; tests/server/test_proxy.py checks it lists exactly FLEET_ROUTES.
SITE_BLOCK_TEMPLATE = """\
# LungMAE-FL coordinator: the only public endpoint. Rendered by `lungmae server proxy-config`; install as
# /etc/nginx/conf.d/lungmae-fleet.conf (inside nginx's http block) and `nginx -t && nginx -s reload`.
#
# - TLS with the consortium server certificate, and MUTUAL TLS: a client must present a certificate issued
#   by the consortium CA (one per site, `lungmae certs --site NAME`) that is not on the CA's revocation list.
# - Only the Fleet API routes a SuperNode uses are forwarded (POST only). Flower's Control API
#   (/v1/control/*: flwr run, node registration) and ServerAppIo/Runtime API (/v1/runtime/*: the ServerApp's
#   task and every site's update) are answered 403 here; they stay on the SuperLink's loopback port.
# - Node registration (/v1/fleet/register-node, unregister-node) is an operator action: not forwarded.
server {
    listen ${listen} ssl;
    server_name ${server_name};

    ssl_certificate         ${certificate};
    ssl_certificate_key     ${private_key};
    ssl_protocols           TLSv1.2 TLSv1.3;
    ssl_client_certificate  ${root_certificates};
    ssl_verify_client       on;
    ssl_verify_depth        1;
    ssl_crl                 ${crl};

    # Model updates travel as 5 MiB chunks; leave room for the protobuf envelope. Bodies and answers stay
    # in memory: nothing a site sends or receives is written to the proxy's disk.
    client_max_body_size     16m;
    client_body_buffer_size  16m;
    proxy_max_temp_file_size 0;

    location ~ ^/v1/fleet/(activate-node|deactivate-node|send-node-heartbeat|pull-messages|push-messages|get-run|get-fab|push-object|pull-object|confirm-message-received)$ {
        limit_except POST { deny all; }
        proxy_pass                    https://127.0.0.1:${upstream_port};
        proxy_http_version            1.1;
        proxy_set_header              Host localhost;
        proxy_set_header              X-Lungmae-Client-DN $ssl_client_s_dn;
        proxy_ssl_trusted_certificate ${root_certificates};
        proxy_ssl_verify              on;
        proxy_ssl_name                localhost;
        proxy_ssl_server_name         on;
        proxy_read_timeout            300s;
        proxy_send_timeout            300s;
    }

    location / {
        return 403 "only the Flower Fleet API is served here";
    }
}
"""

_LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[0-9A-Za-z.-]+):(\d{1,5})$")


def _path(value: Any, what: str) -> str:
    path = Path(value).resolve()
    if not path.is_file():
        raise FederationConfigError(f"Unable to write the proxy config as the {what} {path} does not exist; make it "
                                    "with `lungmae certs --out pki ...`")
    if any(c in str(path) for c in ' ;{}"\'\\$'):
        raise FederationConfigError(f"Unable to write the proxy config as the {what} path {path} contains a space "
                                    "or one of ;{}\"'\\$; move it")
    return str(path)


def render_site_block(*, listen: str, upstream_port: int, tls: Any, crl: Path, server_name: str = "_") -> str:
    """The ``server {}`` block: ``listen`` is ``host:port`` the sites connect to (``0.0.0.0:9091``).

    Args:
        listen: the public address and port.
        upstream_port: the SuperLink's loopback port.
        tls: ``ServerTLS`` (certificate, private key, CA certificate).
        crl: the CA's revocation list (``pki/ca/crl.pem``).
        server_name: nginx ``server_name``. Defaults to ``_`` (any).

    Raises:
        FederationConfigError: for a bad address or a missing file.
    """
    match = _LISTEN_RE.match(listen)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise FederationConfigError(f"--listen must be host:port (e.g. 0.0.0.0:9091); got {listen!r}")
    if not 1 <= int(upstream_port) <= 65535:
        raise FederationConfigError(f"the SuperLink port must be in [1, 65535]; got {upstream_port}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", server_name):
        raise FederationConfigError(f"server name {server_name!r} is not a host name")
    return string.Template(SITE_BLOCK_TEMPLATE).safe_substitute(  # keeps nginx's $variables
        listen=listen, server_name=server_name, upstream_port=int(upstream_port),
        certificate=_path(tls.certificate, "server certificate"), private_key=_path(tls.private_key, "server key"),
        root_certificates=_path(tls.root_certificates, "CA certificate"), crl=_path(crl, "revocation list"))


def render_standalone(site_block: str, workdir: Path) -> str:
    """A complete ``nginx.conf`` that runs in the foreground with every file under ``workdir``."""
    workdir = Path(workdir).resolve()
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    return (
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {workdir / 'access.log'};\n"
        f"    client_body_temp_path {workdir / 'tmp/client'};\n"
        f"    proxy_temp_path {workdir / 'tmp/proxy'};\n"
        f"    fastcgi_temp_path {workdir / 'tmp/fastcgi'};\n"
        f"    uwsgi_temp_path {workdir / 'tmp/uwsgi'};\n"
        f"    scgi_temp_path {workdir / 'tmp/scgi'};\n"
        "    default_type text/plain;\n"
        + "".join(f"    {line}\n" if line else "\n" for line in site_block.splitlines())
        + "}\n")
