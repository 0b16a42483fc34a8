"""The command line of this site's Flower SuperNode, built from ``site.yaml`` (what `lungmae site start` runs).

The SuperNode connects out to the coordinator over TLS (verified with the consortium CA), authenticates with
the site's registered ECDSA key, and hands each message to our ClientApp with ``node_config["site-config"]``
set to the absolute path of ``site.yaml``: that path stays at the hospital (it is only ever read locally).

Examples:
    >>> supernode_command(Path("/etc/lungmae/site.yaml"), connection)
    ['flower-supernode', '--superlink', 'fl.consortium.org:9091', '--root-certificates', '/etc/lungmae/ca.crt',
     '--auth-supernode-private-key', '/etc/lungmae/hospital-a.key', '--host', '127.0.0.1', '--port', '9094',
     '--node-config', 'site-config="/etc/lungmae/site.yaml"']
"""

from __future__ import annotations

from pathlib import Path

from client.node_key import check_site_key
from client.site_config import ConnectionSection
from lungmae_core.errors import SiteConfigError

__all__ = ["ACTIVATION_REFUSED", "SUPERNODE_ADVICE", "deployment_problems", "supernode_command"]

ACTIVATION_REFUSED = 305  # flwr ExitCode.SUPERNODE_CONNECTION_ERROR: also "still online from a crashed run"

# Flower exit code -> what the hospital's IT should do (codes from flwr.supercore.exit.ExitCode).
SUPERNODE_ADVICE = {
    302: "the authentication key is invalid; check connection: auth-key (run `lungmae site preflight`)",
    303: "node authentication needs TLS; set connection: root-certificates",
    305: "the SuperLink refused this SuperNode or could not be reached. If `lungmae site preflight` reaches it, "
         "either this site's key is not registered yet (send the .pub file of connection: auth-key to the "
         "coordinator, who runs `flwr supernode register <site>.pub lungmae --name <site>`), or a SuperNode of "
         "this site stopped abruptly less than a minute ago and the SuperLink still counts it as online "
         "(start again in a minute)",
    600: "connection: superlink is not a valid host:port",
    603: "connection: root-certificates is not a PEM CA certificate (ask the coordinator for ca.crt)",
    604: "a path in the connection section does not exist",
    607: "the ClientApp could not be imported; reinstall the project (pip install -e .) on this host",
}


def deployment_problems(connection: ConnectionSection) -> list[str]:
    """Everything in the ``connection`` section that stops a SuperNode from joining (empty: ready).

    Each entry names the key and how to fix it; paths are expected already resolved (``load_site_config``).
    """
    problems = []
    if connection.root_certificates is None:
        problems.append("connection: 'root-certificates' is not set; give the consortium CA certificate (ca.crt "
                        "from the coordinator): deployment always uses TLS")
    elif not Path(connection.root_certificates).is_file():
        problems.append(f"connection: 'root-certificates' file {connection.root_certificates} does not exist; "
                        "copy ca.crt from the coordinator there")
    if connection.auth_key is None:
        problems.append("connection: 'auth-key' is not set; make a key with `lungmae certs --out DIR --site NAME` "
                        "and send the .pub file to the coordinator for registration")
    elif not Path(connection.auth_key).is_file():
        problems.append(f"connection: 'auth-key' file {connection.auth_key} does not exist; make it with "
                        "`lungmae certs --out DIR --site NAME`")
    if connection.metrics_port is not None and connection.metrics_port == connection.node_port:
        problems.append(f"connection: 'metrics-port' and 'node-port' are both {connection.node_port}; use two "
                        "different free ports")
    return problems


def _node_config_value(path: Path) -> str:
    text = str(path)
    if '"' in text or "\\" in text:
        raise SiteConfigError(
            f"Unable to pass the site config path {text} to the SuperNode as it contains a quote or backslash; "
            "move site.yaml to a path without them")
    return f'site-config="{text}"'


def supernode_command(site_config: Path, connection: ConnectionSection, *,
                      executable: str = "flower-supernode") -> list[str]:
    """The ``flower-supernode`` command for this site.

    Args:
        site_config: path of ``site.yaml`` (made absolute; it is read only by this site's ClientApp).
        connection: the validated ``connection`` section of ``site.yaml``, with paths already resolved.
        executable: the SuperNode program. Defaults to ``flower-supernode``.

    Returns:
        The argument vector.

    Raises:
        SiteConfigError: listing everything missing in the connection section, or an unusable key.
    """
    problems = deployment_problems(connection)
    if problems:
        listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, start=1))
        raise SiteConfigError(f"{site_config} is not ready to join the federation:\n{listed}")
    check_site_key(connection.auth_key)  # type: ignore[arg-type]  (not None: checked above)
    cmd = [
        executable,
        "--superlink", connection.superlink,
        "--root-certificates", str(Path(connection.root_certificates).resolve()),  # type: ignore[arg-type]
        "--auth-supernode-private-key", str(Path(connection.auth_key).resolve()),  # type: ignore[arg-type]
        "--host", "127.0.0.1",
        "--port", str(connection.node_port),
        "--node-config", _node_config_value(Path(site_config).resolve()),
    ]
    return cmd
