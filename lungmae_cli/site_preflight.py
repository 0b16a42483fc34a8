"""`lungmae site preflight --config site.yaml`: check that this site is ready to join, one line per check.

Every check runs even when an earlier one fails; each failure has a `fix:` line. Exit status 0 when all
checks pass (SKIP lines are fine), 1 otherwise. Safe to run at any time: it changes nothing but a probe file
in the cache directory, and its SuperLink check only completes a TLS handshake.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae site preflight`."""
    parser.add_argument("--config", type=Path, required=True, help="the site's site.yaml")
    parser.add_argument("--min-free-gb", type=float, default=5.0, help="free disk the cache needs, in GB (5)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="SuperLink connection timeout (10 s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the checks and print them."""
    import json

    from client.preflight import run_preflight

    printer = None if args.json else (lambda result: print(result.render(), flush=True))
    report = run_preflight(args.config, min_free_gb=args.min_free_gb, tls_timeout_s=args.timeout_s,
                           on_result=printer)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(report.render().splitlines()[-1])
    return 0 if report.ok else 1
