"""`lungmae server run --config federation.yaml`: submit the federation to the running SuperLink and follow it.

Writes the `lungmae` connection into ``$FLWR_HOME/config.toml``, runs ``flwr run`` of this project with run
config ``federation-config=<absolute path of federation.yaml>``, then polls ``flwr list`` until the run ends
(``flwr run --stream`` exits 0 even when a run fails). If the SuperLink restarts under the run, the dead run is
stopped and submitted again, and the ServerApp resumes from the run directory's last checkpoint. Run it again
after a crash of this command: it follows the run recorded in ``<run-dir>/flwr-run.json``.
Exit status: 0 completed, 1 failed or stopped, 3 SuperLink unreachable too long.

It submits on the server host only: the connection points at the SuperLink's loopback port (its Control
API is not behind the proxy). With ``--signing-key`` (the consortium's ``signing/fab-signing.key``) it builds
the app bundle exactly as ``flwr run`` does (Flower's deterministic ``build_fab_from_disk``), signs its
SHA-256 and passes the signature as run config ``fab-signature``; sites that trust the key run it, every
other site refuses it before importing any of it (``client/fab_check.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _project_dir() -> Path:
    """The directory of this project's pyproject.toml (the Flower app), found from the installed package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "server" / "server_app.py").is_file():
            return candidate
    return Path.cwd()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae server run`."""
    parser.add_argument("--config", type=Path, required=True, help="the coordinator's federation.yaml")
    parser.add_argument("--app", type=Path, default=None,
                        help="the Flower app directory (with pyproject.toml). Default: this installed project")
    parser.add_argument("--signing-key", type=Path, default=None,
                        help="the consortium's Ed25519 app-signing key (pki/signing/fab-signing.key); without it "
                             "the bundle is unsigned and sites accept it only by sha256 allow-list")
    parser.add_argument("--new", action="store_true",
                        help="submit a new run even if flwr-run.json records an active one")
    parser.add_argument("--max-restarts", type=int, default=3, help="resubmissions after SuperLink restarts (3)")
    parser.add_argument("--poll-s", type=float, default=5.0, help="seconds between status polls (5)")
    parser.add_argument("--unreachable-limit-s", type=float, default=3600.0,
                        help="give up when the SuperLink stays unreachable this long (3600)")


def run(args: argparse.Namespace) -> int:
    """Submit or follow the federation until it ends."""
    from lungmae_cli._process import flower_env
    from server.federation_config import load_federation_config
    from server.ops.run_control import FlwrCLI, RunFollower
    from server.ops.superlink import LOOPBACK, ServerTLS, split_address, write_connection

    cfg = load_federation_config(args.config)
    tls = ServerTLS.from_section(cfg.server, base_dir=args.config.resolve().parent)
    write_connection(f"{LOOPBACK}:{split_address(cfg.server.superlink)[1]}", tls.root_certificates)
    app = (args.app or _project_dir()).resolve()
    if not (app / "pyproject.toml").is_file():
        from lungmae_core.errors import LungMAEError

        raise LungMAEError(f"Unable to submit the federation as {app} has no pyproject.toml; give --app with the "
                           "LungMAE-FL project directory")
    if not cfg.resume:
        print(f"lungmae: warning: {args.config} sets resume: false, so a run submitted again after a SuperLink "
              "restart starts over from round 1 instead of resuming from the last checkpoint", flush=True)
    import tempfile

    from lungmae_core.signing import fab_sha256, load_private_key, sign_fab

    private = load_private_key(args.signing_key) if args.signing_key is not None else None  # fails before building
    with tempfile.TemporaryDirectory(prefix="lungmae-app-") as tmp:
        # every submission (resubmissions after a SuperLink restart included) packs this snapshot, so the
        # bundle the sites get is the one signed here even if the app directory changes meanwhile
        snapshot, fab = snapshot_app(app, Path(tmp) / "app")
        run_config = {}
        if private is not None:
            run_config["fab-signature"] = sign_fab(fab, private)
        signed = f"signed with {args.signing_key}" if private is not None else "unsigned: sites must allow-list it"
        print(f"lungmae: app bundle sha256 {fab_sha256(fab)} ({len(fab)} bytes) {signed}", flush=True)
        follower = RunFollower(FlwrCLI(env=flower_env()), snapshot, args.config, cfg.run_dir,
                               max_restarts=args.max_restarts, poll_s=args.poll_s,
                               unreachable_limit_s=args.unreachable_limit_s,
                               say=lambda line: print(f"lungmae: {line}", flush=True), run_config=run_config)
        return follower.follow(resume_existing=not args.new)


def snapshot_app(app: Path, dest: Path) -> tuple[Path, bytes]:
    """Build the app bundle once, unpack its files into ``dest`` and check that ``dest`` builds the same bytes.

    Why: ``flwr run`` builds the bundle itself from a directory. Building it from a snapshot of exactly the
    files signed (instead of from the live app directory) means an edit of the app between signing and
    submitting, or before a resubmission, cannot change what the sites receive.

    Returns:
        ``(dest, bundle bytes)``.

    Raises:
        LungMAEError: if the snapshot does not rebuild to the same bytes (Flower's build would then not be
            deterministic, and a signature could not match).
    """
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from lungmae_core.errors import LungMAEError

    fab = build_fab_from_disk(app)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        for name in bundle.namelist():
            target = (dest / name).resolve()
            if name.startswith(".info/") or not target.is_relative_to(dest.resolve()):
                continue  # Flower's own manifest is made again by the build
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bundle.read(name))
    if build_fab_from_disk(dest) != fab:
        raise LungMAEError(f"Unable to submit {app} as its bundle does not rebuild to the same bytes from a copy of "
                           "its files; the signature would not match what the sites receive")
    return dest, fab
