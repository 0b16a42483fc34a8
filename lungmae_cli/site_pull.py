"""`lungmae site pull`: fetch this site's CT studies from the hospital PACS (DICOMweb) into its import folder.

Reads ``pacs`` and ``data.input`` from ``site.yaml``. Queries the CT studies whose StudyDate is on or after
``--since`` (default ``pacs.since``) and on or before ``--until``, retrieves the series not yet pulled, and
prints what it did. ``--prepare`` runs `lungmae site prepare` afterwards. Exits 0 when every listed series is
in the import folder, 1 when some could not be pulled (each is named with the reason), 2 on a configuration
error or when the PACS cannot be reached.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae site pull`."""
    parser.add_argument("--config", type=Path, required=True, help="site.yaml (its pacs and data sections)")
    parser.add_argument("--since", default=None, help="first StudyDate to pull, YYYY-MM-DD (default: pacs.since)")
    parser.add_argument("--until", default=None, help="last StudyDate to pull, YYYY-MM-DD (default: no end)")
    parser.add_argument("--prepare", action="store_true", help="run `lungmae site prepare` after the pull")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in logs)")


def run(args: argparse.Namespace) -> int:
    """Pull, print the summary and optionally prepare."""
    from client.pacs_config import parse_study_date
    from client.pacs_pull import PacsPuller
    from client.site_config import load_site_config
    from lungmae_core.errors import SiteConfigError

    cfg = load_site_config(args.config)
    if cfg.data.input is None:
        raise SiteConfigError(f"{cfg.source}: 'data' has no 'input'; set data.input to the import folder that "
                              "`lungmae site pull` fills and `lungmae site prepare` reads")
    since_text = args.since if args.since is not None else cfg.pacs.since
    if since_text is None:
        raise SiteConfigError(f"{cfg.source}: no start date: pass --since YYYY-MM-DD or set pacs.since (a PACS holds "
                              "years of studies; pulling all of them is never what is meant)")
    since = parse_study_date(since_text, "--since" if args.since is not None else f"{cfg.source}: pacs 'since'")
    until = parse_study_date(args.until, "--until") if args.until is not None else None
    if until is not None and until < since:
        raise SiteConfigError(f"--until {until} is before the start date {since}")
    puller = PacsPuller(cfg.pacs, cfg.data.input, progress=not args.no_progress, source=cfg.source)
    report = puller.fetch(puller.plan(since, until))
    print(report.summary())
    if args.prepare:
        from lungmae_cli import site_prepare

        prepared = site_prepare.run(argparse.Namespace(config=args.config, input=None, cache=None, labels=None,
                                                       workers=None, no_progress=args.no_progress))
        if prepared != 0:
            return prepared
    else:
        print(f"Next: lungmae site prepare --config {args.config}")
    return 1 if report.failed else 0
