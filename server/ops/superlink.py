"""The coordinator's Flower SuperLink command line and the Flower CLI connection that talks to it.

`lungmae server start` runs the SuperLink with TLS, SuperNode authentication (only registered site keys may
join), a persistent state database (registrations and runs survive a restart) and runtime dependency
installation disabled (the coordinator never downloads packages at run time). `lungmae server run` and
`lungmae server status` reach it through a named connection in ``$FLWR_HOME/config.toml``.

Least exposure. Flower 1.42 serves the Fleet API (sites), the Control API (``flwr run``, node
registration; no user authentication in the open-source release) and the ServerAppIo/Runtime API (the
ServerApp's task, every site's update) on ONE port. So the SuperLink binds the loopback address only, and
the sites reach it through a reverse proxy (``server/ops/proxy.py``: nginx with mutual TLS that forwards only
the Fleet routes). Control and ServerAppIo stay on the server host.

The SuperExec secret. In its default ``subprocess`` isolation the SuperLink ignores
``--superexec-auth-secret-file`` (``flwr/superlink/cli/flower_superlink.py``: "SuperExec auth secret is
ignored in subprocess isolation mode"), and ``AcquireTask`` then hands the ServerApp's task to the first
local caller. We run it with ``--isolation process`` and the secret, and start ``flower-superexec`` ourselves
with the same secret (:func:`superexec_command`): every ``AcquireTask`` must then carry an HMAC of the secret
(``flwr/supercore/dependencies/superexec.py``), so a local process that does not hold the secret file (0600,
owned by the service user) cannot take the ServerApp's task.

Examples:
    >>> tls = ServerTLS.from_section(federation.server, base_dir=Path("/etc/lungmae"))
    >>> superlink_command(federation.server.superlink, tls, database=Path("/var/lib/lungmae/superlink.db"))
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from lungmae_core.atomic import atomic_path
from lungmae_core.errors import FederationConfigError

__all__ = [
    "CONNECTION_NAME",
    "LOOPBACK",
    "ensure_superexec_secret",
    "superexec_command",
    "SUPERLINK_ADVICE",
    "ServerTLS",
    "flwr_home",
    "split_address",
    "superlink_command",
    "write_connection",
]

CONNECTION_NAME = "lungmae"

SUPERLINK_ADVICE = {
    104: "invalid arguments; check 'server' in federation.yaml",
    105: "the state database was made by another Flower version; move it away (registrations must be redone)",
    600: "'server: superlink' is not a valid host:port",
    604: "a certificate or key path in 'server' does not exist",
    605: "the server certificate or key is invalid or they do not match; remake them with `lungmae certs`",
}

LOOPBACK = "127.0.0.1"
_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def split_address(address: str, what: str = "server: superlink") -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``.

    Raises:
        FederationConfigError: naming ``what`` and showing the expected form.
    """
    match = _ADDRESS_RE.match(address or "")
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise FederationConfigError(f"{what} must be host:port (e.g. 0.0.0.0:9091 or fl.consortium.org:9091); "
                                    f"got {address!r}")
    return match.group(1).strip("[]"), int(match.group(2))


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """The SuperLink's TLS files, as absolute paths.

    Args:
        certificate: server certificate (PEM, with the SANs sites connect to).
        private_key: its private key.
        root_certificates: the consortium CA certificate.
    """

    certificate: Path
    private_key: Path
    root_certificates: Path

    @classmethod
    def from_section(cls, server: Any, base_dir: Path) -> ServerTLS:
        """Read ``certificate``, ``private-key`` and ``root-certificates`` of federation.yaml's ``server`` section.

        Relative paths are relative to ``base_dir`` (the folder of federation.yaml).

        Raises:
            FederationConfigError: listing every missing key or file, with how to make them.
        """
        problems, paths = [], {}
        for key, attr in (("certificate", "certificate"), ("private-key", "private_key"),
                          ("root-certificates", "root_certificates")):
            value = str(getattr(server, attr, "") or "")
            if not value:
                problems.append(f"server: '{key}' is not set")
                continue
            path = Path(os.path.expanduser(value))
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                problems.append(f"server: '{key}' file {path} does not exist")
            paths[attr] = path.resolve()
        if problems:
            listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, start=1))
            raise FederationConfigError(
                "Unable to start the SuperLink with TLS as federation.yaml is missing:\n" + listed +
                "\nMake them with `lungmae certs --out pki --server-name <dns> --server-ip <ip>` and set "
                "server: {certificate: pki/server/server.pem, private-key: pki/server/server.key, "
                "root-certificates: pki/ca/ca.crt}")
        return cls(**paths)


def ensure_superexec_secret(path: Path) -> Path:
    """Create the SuperExec shared secret (32 random bytes from the OS, hex, mode 0600) if it is missing.

    Raises:
        FederationConfigError: if the existing file is empty or readable by others.
    """
    from lungmae_core.atomic import atomic_write_bytes

    if path.exists():
        if path.stat().st_size == 0:
            raise FederationConfigError(f"The SuperExec secret {path} is empty; delete it to have a new one made")
        if path.stat().st_mode & 0o077:
            raise FederationConfigError(f"The SuperExec secret {path} is readable by other users "
                                        f"(mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, os.urandom(32).hex().encode(), 0o600)
    return path


def superexec_command(address: str, tls: ServerTLS, *, secret_file: Path, parent_pid: int | None = None,
                      executable: str = "flower-superexec") -> list[str]:
    """The ``flower-superexec`` that launches the ServerApp for each run (``--isolation process``).

    It reaches the SuperLink's Runtime API on the loopback port of ``address`` over TLS, and signs its
    ``AcquireTask`` calls with the shared secret.
    """
    _, port = split_address(address)
    cmd = [executable, "--root-certificates", str(tls.root_certificates),
           "--runtime-api-address", f"{LOOPBACK}:{port}", "--superexec-auth-secret-file", str(secret_file)]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def superlink_command(address: str, tls: ServerTLS, *, database: Path, listen_host: str | None = None,
                      log_file: Path | None = None, executable: str = "flower-superlink",
                      superexec_secret: Path | None = None) -> list[str]:
    """The ``flower-superlink`` command.

    Args:
        address: ``server: superlink`` (``host:port``); the port is the one SuperLink serves on.
        tls: certificate, key and CA.
        database: SQLite state file (registered sites, runs); created if missing.
        listen_host: address to bind. Defaults to 127.0.0.1: sites come through the proxy. Binding another
            address exposes the Control and ServerAppIo APIs to that network.
        log_file: also write the SuperLink log there (rotated by Flower).
        executable: the SuperLink program.
        superexec_secret: with a secret file, ``--isolation process`` and the secret (start
            :func:`superexec_command` beside it); without, Flower's default subprocess mode, where the
            secret cannot be enforced.
    """
    _, port = split_address(address)
    database.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        executable,
        "--ssl-certfile", str(tls.certificate),
        "--ssl-keyfile", str(tls.private_key),
        "--ssl-ca-certfile", str(tls.root_certificates),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(database.resolve()),
        "--host", listen_host or LOOPBACK,
        "--port", str(port),
    ]
    if superexec_secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    return cmd


def flwr_home() -> Path:
    """The Flower CLI's home (``$FLWR_HOME``, default ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(address: str, root_certificates: Path, *, name: str = CONNECTION_NAME,
                     home: Path | None = None) -> Path:
    """Add or update ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` (other entries are kept).

    Returns:
        The path of ``config.toml``.
    """
    import tomli
    import tomli_w

    home = flwr_home() if home is None else home
    path = home / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomli.loads(path.read_text(encoding="utf-8"))
        except tomli.TOMLDecodeError as exc:
            raise FederationConfigError(f"Unable to update {path} as it is not valid TOML: {exc}; fix or remove "
                                        "it") from exc
    superlink = data.setdefault("superlink", {})
    superlink.setdefault("default", name)
    superlink[name] = {"address": address, "root-certificates": str(Path(root_certificates).resolve())}
    with atomic_path(path, 0o600) as tmp, open(tmp, "wb") as fh:
        tomli_w.dump(data, fh)
    return path
