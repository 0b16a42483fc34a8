"""`lungmae audit verify RUN_DIR|LOG...`: check hash-chained audit logs and report the first broken link.

Given a run directory it checks ``audit.jsonl`` (the coordinator's log); given a file it checks that log (a
site's ``site-audit.jsonl`` too). Each log's chain is walked line by line: a line whose ``prev`` is not the
hash of the line before it (an edited, removed or reordered line) is reported by number, and the head file
catches a removed last line. With ``--public-key`` (the server's ``audit-signing.pub``) the server's
signature on every checkpoint line is checked as well; checkpoint files still present must match their
recorded SHA-256. Exit status: 0 every log intact, 1 a log is broken.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae audit verify`."""
    parser.add_argument("paths", type=Path, nargs="+", metavar="RUN_DIR_OR_LOG",
                        help="a run directory (its audit.jsonl) or a log file (e.g. a site's site-audit.jsonl)")
    parser.add_argument("--public-key", type=Path, default=None,
                        help="the server's audit-signing.pub: also verify the signature of checkpoint lines")
    parser.add_argument("--no-files", action="store_true",
                        help="do not compare recorded checkpoint SHA-256 with the files")


def run(args: argparse.Namespace) -> int:
    """Verify each log; print one line per log."""
    from lungmae_core.errors import LungMAEError
    from server.audit import verify_audit_log

    status = 0
    for path in args.paths:
        log = path / "audit.jsonl" if path.is_dir() else path
        if not log.is_file():
            raise LungMAEError(f"Unable to verify {path} as {log} does not exist; give a run directory holding "
                               "audit.jsonl or a log file")
        report = verify_audit_log(log, args.public_key, check_files=not args.no_files)
        print(report.render())
        status = status or (0 if report.ok else 1)
    return status
