"""The command line of this site's Flower SuperNode, built from ``site.yaml`` (what `lungmae site start` runs).

`lungmae site start` does not exec ``flower-superlink`` directly but this module's launcher
(:func:`launch_command`, ``python -m client.supernode``), which runs Flower's SuperNode in-process after two
changes Flower 1.42 has no option for:

* **Mutual TLS.** The coordinator's proxy asks each site for its client certificate (``trust:
  client-certificate`` / ``client-key``), but Flower's Fleet HTTP client only takes a CA. The launcher gives
  the SuperNode's HTTP client (``flwr.supercore.protobuf.client.ProtobufClient``, the one whose base URL is
  the coordinator) an SSL context holding the consortium CA and the site's certificate.
* **Only approved app bundles.** A directory holding the checking ``flwr-clientapp`` (``client/fab_check.py``)
  is put first on ``PATH``, so Flower's SuperExec starts it for every message.
* **Fast exchanges.** With ``--warm-socket`` (the default of `lungmae site start`), the launcher starts the
  site's warm ClientApp process (``client/warm_clientapp.py``) beside the SuperNode, so a message no longer
  pays for importing torch & co. in a fresh process; and the SuperNode's pause after an empty pull (a fixed
  3 s in Flower 1.42's ``start_client_internal``) is shortened to ``--idle-pull-s`` (0.5 s), one small HTTP
  request per pause to the coordinator, its wait for the ClientApp's reply looks every
  :data:`LOCAL_WAIT_S` (0.05 s) instead of every 0.5 s (a check of its own state, no request), and it asks
  again for an object of a message that is still being uploaded after 0.05 s, not 1 s
  (``lungmae_core.bundle.OBJECT_RETRY``: in a round's benchmark one site lost ~1 s to Flower's first pause in
  the first round of each phase).

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

import functools
import os
import shutil
import ssl
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.node_key import check_site_key
from client.site_config import ConnectionSection
from lungmae_core.bundle import OBJECT_RETRY
from lungmae_core.errors import SiteConfigError

__all__ = ["ACTIVATION_REFUSED", "IDLE_PULL_S", "LOCAL_WAIT_S", "SUPEREXEC_POLL_INTERVAL_S", "SUPERNODE_ADVICE",
           "client_tls_context", "deployment_problems", "launch_command", "main", "supernode_command"]

ACTIVATION_REFUSED = 305  # flwr ExitCode.SUPERNODE_CONNECTION_ERROR: also "still online from a crashed run"
#: Seconds between the SuperNode's pulls while idle (Flower 1.42 waits 3 s after an empty pull).
IDLE_PULL_S = 0.5
#: Seconds between the SuperNode's looks at its own state for the ClientApp's reply (Flower 1.42: 0.5 s,
#: 0.25 s on average added to every exchange before the reply leaves; a look is an in-process check).
LOCAL_WAIT_S = 0.05
#: Flower's pauses of this length or more are its idle pull of the SuperLink (3 s), shorter ones local waits.
_IDLE_PULL_MIN_S = 1.0
#: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for the SuperNode: how often its SuperExec looks for a task to start
#: (Flower's default 1 s is up to a second of idle time per exchange; a local poll costs next to nothing).
SUPEREXEC_POLL_INTERVAL_S = 0.1

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
    # The two files a SuperNode cannot join without: (key, path, how to get it, how to put it in place).
    required = (
        ("root-certificates", connection.root_certificates,
         "give the consortium CA certificate (ca.crt from the coordinator): deployment always uses TLS",
         "copy ca.crt from the coordinator there"),
        ("auth-key", connection.auth_key,
         "make a key with `lungmae certs --out DIR --site NAME` and send the .pub file to the coordinator for "
         "registration",
         "make it with `lungmae certs --out DIR --site NAME`"),
    )
    for key, path, when_unset, when_missing in required:
        if path is None:
            problems.append(f"connection: '{key}' is not set; {when_unset}")
        elif not Path(path).is_file():
            problems.append(f"connection: '{key}' file {path} does not exist; {when_missing}")
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
    # deployment_problems names a missing auth-key or root-certificates
    assert connection.auth_key is not None and connection.root_certificates is not None
    check_site_key(connection.auth_key)
    cmd = [
        executable,
        "--superlink", connection.superlink,
        "--root-certificates", str(Path(connection.root_certificates).resolve()),
        "--auth-supernode-private-key", str(Path(connection.auth_key).resolve()),
        "--host", "127.0.0.1",
        "--port", str(connection.node_port),
        "--node-config", _node_config_value(Path(site_config).resolve()),
    ]
    return cmd


def launch_command(site_config: Path, cfg: Any, *, warm: bool = True) -> list[str]:
    """The command `lungmae site start` runs: this module's launcher around :func:`supernode_command`.

    Args:
        site_config: path of ``site.yaml``.
        cfg: the loaded ``SiteConfig`` (its ``site``, ``connection`` and ``trust`` sections).
        warm: run the warm ClientApp process, its socket in ``<site: state-dir>/warm-clientapp/``.

    Raises:
        SiteConfigError: as :func:`supernode_command`, or for a client certificate file that does not exist.
    """
    cmd = supernode_command(site_config, cfg.connection)
    launcher = [sys.executable, "-m", "client.supernode", "--site-config", str(Path(site_config).resolve())]
    if warm and cfg.site.state_dir is not None:
        from client.warm_clientapp import warm_socket_path

        launcher += ["--warm-socket", str(warm_socket_path(cfg.site.state_dir))]
    trust = cfg.trust
    if trust.client_certificate is not None:
        for key, path in (("client-certificate", trust.client_certificate), ("client-key", trust.client_key)):
            if not Path(path).is_file():
                raise SiteConfigError(f"{site_config}: trust: '{key}' file {path} does not exist; the coordinator "
                                      "makes it with `lungmae certs --site NAME` (sites/NAME/NAME.client.pem/.key)")
        launcher += ["--client-certificate", str(Path(trust.client_certificate).resolve()),
                     "--client-key", str(Path(trust.client_key).resolve())]
    return [*launcher, "--", *cmd]


def client_tls_context(root_certificates: Path, certificate: Path, key: Path) -> ssl.SSLContext:
    """An SSL client context that verifies the coordinator with the CA and presents the site's certificate.

    Raises:
        SiteConfigError: if the certificate and key cannot be loaded (naming both files).
    """
    context = ssl.create_default_context(cafile=str(root_certificates))
    try:
        context.load_cert_chain(str(certificate), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise SiteConfigError(f"Unable to load the TLS client certificate {certificate} with key {key}: {exc}; "
                              "get them again from the coordinator (`lungmae certs --site NAME`)") from exc
    return context


def _patch_fleet_client(superlink: str, context: ssl.SSLContext) -> None:
    """Make the SuperNode's HTTP client for ``superlink`` use ``context`` (mutual TLS)."""
    from flwr.supercore.protobuf import client as protobuf_client

    cls = protobuf_client.ProtobufClient
    original_init = cls.__init__
    target = f"https://{superlink}"

    def init_with_client_certificate(self: Any, base_url: str, *args: Any, **kwargs: Any) -> None:
        if base_url.rstrip("/") == target:
            kwargs["verify"] = context
        original_init(self, base_url, *args, **kwargs)

    cls.__init__ = init_with_client_certificate  # type: ignore[method-assign]


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


class _CappedSleep:
    """Stands in for the ``time`` module in Flower's SuperNode loop: shorter pauses, the rest untouched.

    Flower 1.42's loop (``flwr/supernode/start_client_internal.py``) pauses 3 s after an empty pull of the
    SuperLink (a request over the network each time) and 0.5 s in its waits on its own node state (the
    ClientApp's reply, an object's content: in-process checks). Pauses of :data:`_IDLE_PULL_MIN_S` or more
    are the idle pull's and last at most ``idle_cap``; shorter ones at most ``local_cap``.
    """

    def __init__(self, idle_cap: float, local_cap: float) -> None:
        import time

        self._time, self._idle_cap, self._local_cap = time, idle_cap, local_cap

    def sleep(self, seconds: float) -> None:
        self._time.sleep(min(seconds, self._idle_cap if seconds >= _IDLE_PULL_MIN_S else self._local_cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)


def _shorten_supernode_waits(cap_s: float, local_wait_s: float = LOCAL_WAIT_S) -> None:
    """Make the SuperNode pull again after ``cap_s`` seconds, not 3 s, when the SuperLink had nothing for it,
    look for the ClientApp's reply every ``local_wait_s`` seconds, not 0.5 s, and ask again for a message's
    missing object after 0.05 s, not 1 s (``OBJECT_RETRY``; with another Flower layout that is left as it is)."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleep(cap_s, local_wait_s)  # type: ignore[attr-defined,assignment]
    try:
        from flwr.supercore.inflatable.inflatable_utils import pull_objects
    except ImportError:
        return
    if getattr(start_client_internal, "pull_objects", None) is pull_objects:
        start_client_internal.pull_objects = functools.partial(  # type: ignore[attr-defined]
            pull_objects, **OBJECT_RETRY)


def _start_warm_process(socket_path: Path) -> Any:
    """Start the site's warm ClientApp process; it is SIGKILLed when this process dies, stopped at exit."""
    import atexit
    import signal
    import subprocess

    from client.warm_clientapp import die_with_parent

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "client.warm_clientapp", "--socket", str(socket_path)],
                            env=env, preexec_fn=die_with_parent)  # noqa: PLW1509 (no threads yet here)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    atexit.register(stop)
    return proc


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m client.supernode --site-config S [--client-certificate C --client-key K] [--warm-socket W]
    -- flower-supernode ...``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m client.supernode", description=main.__doc__)
    parser.add_argument("--site-config", required=True)
    parser.add_argument("--client-certificate")
    parser.add_argument("--client-key")
    parser.add_argument("--warm-socket", type=Path,
                        help="run the warm ClientApp process on this Unix socket (its folder: 0700)")
    parser.add_argument("--idle-pull-s", type=float, default=IDLE_PULL_S,
                        help=f"seconds between pulls while idle (Flower: 3; default {IDLE_PULL_S})")
    parser.add_argument("--local-wait-s", type=float, default=LOCAL_WAIT_S,
                        help=f"seconds between looks for the ClientApp's reply (Flower: 0.5; default {LOCAL_WAIT_S})")
    parser.add_argument("flower", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower = args.flower[1:] if args.flower[:1] == ["--"] else list(args.flower)
    if not flower or Path(flower[0]).name != "flower-supernode":
        parser.error("expected `-- flower-supernode ARGS...` after the launcher's options")
    if not 0 < args.idle_pull_s <= 3:
        parser.error(f"--idle-pull-s must be in (0, 3] seconds, got {args.idle_pull_s}")
    if not 0 < args.local_wait_s <= 0.5:
        parser.error(f"--local-wait-s must be in (0, 0.5] seconds, got {args.local_wait_s}")
    from client.fab_check import SITE_CONFIG_ENV, install_launcher

    bin_dir = Path(tempfile.mkdtemp(prefix="lungmae-supernode-"))
    install_launcher(bin_dir, args.warm_socket)
    os.environ[SITE_CONFIG_ENV] = args.site_config
    os.environ["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                          os.environ.get("PATH", "")])
    if args.warm_socket is not None:
        _start_warm_process(args.warm_socket)
    if args.client_certificate:
        superlink, ca = _option(flower, "--superlink"), _option(flower, "--root-certificates")
        if superlink is None or ca is None:
            parser.error("mutual TLS needs --superlink and --root-certificates in the SuperNode command")
        _patch_fleet_client(superlink, client_tls_context(Path(ca), Path(args.client_certificate),
                                                          Path(args.client_key)))
    _shorten_supernode_waits(args.idle_pull_s, args.local_wait_s)
    import atexit

    atexit.register(shutil.rmtree, bin_dir, True)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = flower
    flower_supernode()


if __name__ == "__main__":
    main()
