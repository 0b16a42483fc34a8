"""`lungmae server run --config federation.yaml`: submit the federation to the running SuperLink and follow it.

Writes the `lungmae` connection into ``$FLWR_HOME/config.toml``, runs ``flwr run`` of this project with run
config ``federation-config=<absolute path of federation.yaml>``, then polls ``flwr list`` until the run ends
(``flwr run --stream`` exits 0 even when a run fails). If the SuperLink restarts under the run, the dead run is
stopped and submitted again, and the ServerApp resumes from the run directory's last checkpoint. Run it again
after a crash of this command: it follows the run recorded in ``<run-dir>/flwr-run.json``.
Exit status: 0 completed, 1 failed or stopped, 3 SuperLink unreachable too long.
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
    from server.run_control import FlwrCLI, RunFollower
    from server.superlink import ServerTLS, write_connection

    cfg = load_federation_config(args.config)
    tls = ServerTLS.from_section(cfg.server, base_dir=args.config.resolve().parent)
    write_connection(cfg.server.superlink, tls.root_certificates)
    app = (args.app or _project_dir()).resolve()
    if not (app / "pyproject.toml").is_file():
        from lungmae_core.errors import LungMAEError

        raise LungMAEError(f"Unable to submit the federation as {app} has no pyproject.toml; give --app with the "
                           "LungMAE-FL project directory")
    if not cfg.resume:
        print(f"lungmae: warning: {args.config} sets resume: false, so a run submitted again after a SuperLink "
              "restart starts over from round 1 instead of resuming from the last checkpoint", flush=True)
    follower = RunFollower(FlwrCLI(env=flower_env()), app, args.config, cfg.run_dir,
                           max_restarts=args.max_restarts, poll_s=args.poll_s,
                           unreachable_limit_s=args.unreachable_limit_s,
                           say=lambda line: print(f"lungmae: {line}", flush=True))
    return follower.follow(resume_existing=not args.new)
