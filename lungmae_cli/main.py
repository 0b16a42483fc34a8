"""Entry point of the ``lungmae`` command: dispatches to one module per subcommand.

Each subcommand lives in ``lungmae_cli/<module>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Those modules keep their top-level imports light (argparse, pathlib) so that
``lungmae --help`` answers at once; torch, flwr and friends are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lungmae_core.errors import LungMAEError

# (words, module, one-line help). Words are the subcommand path: ("site", "prepare") is `lungmae site prepare`.
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("train",), "lungmae_cli.train", "Centralized pretrain + fine-tune on phantoms or a prepared cache."),
    (("simulate",), "lungmae_cli.simulate", "Federated simulation on synthetic hospitals (the main job)."),
    (("experiment",), "lungmae_cli.experiment",
     "Label-scarcity experiment: federated MAE vs scratch and every baseline arm."),
    (("synth",), "lungmae_cli.synth", "Write synthetic hospitals: DICOM trees of CT phantoms plus labels."),
    (("site", "prepare"), "lungmae_cli.site_prepare",
     "Index, check and preprocess a site's DICOM/NIfTI into its cache."),
    (("site", "pull"), "lungmae_cli.site_pull",
     "Fetch new CT studies from the hospital PACS (DICOMweb) into the import folder."),
    (("site", "preflight"), "lungmae_cli.site_preflight", "Check that a site is ready to join the federation."),
    (("site", "ledger"), "lungmae_cli.site_ledger", "Show the site's privacy ledger, or reset it with a reason."),
    (("site", "policy"), "lungmae_cli.site_policy",
     "Print the policy this site enforces on every coordinator request."),
    (("site", "start"), "lungmae_cli.site_start", "Start this site's Flower SuperNode (long-running)."),
    (("server", "start"), "lungmae_cli.server_start", "Start the coordinator's Flower SuperLink (long-running)."),
    (("server", "run"), "lungmae_cli.server_run", "Submit (or resume) the federation to the running SuperLink."),
    (("server", "proxy-config"), "lungmae_cli.server_proxy",
     "Print the nginx config that exposes only the Fleet API, with mutual TLS."),
    (("audit", "verify"), "lungmae_cli.audit", "Check hash-chained audit logs; report the first broken link."),
    (("server", "status"), "lungmae_cli.server_status", "Show sites, phase, round and metrics of the federation."),
    (("certs",), "lungmae_cli.certs", "Make the consortium CA, server certificate and site authentication keys."),
    (("report",), "lungmae_cli.report", "Render report.html from a run directory."),
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser; subcommands whose module is absent are left out."""
    parser = argparse.ArgumentParser(
        prog="lungmae",
        description="LungMAE-FL: federated 3D masked-autoencoder pretraining on chest CT, then ILD classification. "
                    "Researchers: simulate, train, report. Hospital IT: site prepare/preflight/start. "
                    "Coordinators: certs, server start/run/status.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command")}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for words, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                parsers[prefix] = sub
                groups[prefix] = sub.add_subparsers(dest="_".join(prefix) + "_command")
        leaf = groups[words[:-1]].add_parser(words[-1], help=help_text, description=help_text)
        module.add_arguments(leaf)
        leaf.set_defaults(_run=module.run)
        parsers[words] = leaf
    parser.set_defaults(_parsers=parsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lungmae``; returns the process exit code (errors we raise on purpose exit 2 with one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 and getattr(args, "quiet", False) else (
        logging.INFO if args.verbose < 2 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except LungMAEError as exc:
        print(f"lungmae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lungmae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
