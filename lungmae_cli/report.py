"""``lungmae report RUN_DIR [--out FILE]``: render the self-contained report.html of a run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lungmae report``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="run directory written by the server (has run_config.json and metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="where to write the page (default: RUN_DIR/report.html)")
    parser.add_argument("--no-reconstructions", action="store_true",
                        help="skip the MAE reconstructions of the synthetic phantom (no torch work)")


def run(args: argparse.Namespace) -> int:
    """Render the report and print its path; errors in the run directory exit 2 with one line."""
    from server.report import render_report

    path = render_report(args.run_dir, args.out, reconstructions=not args.no_reconstructions)
    print(f"report written: {path}", file=sys.stdout)
    return 0
