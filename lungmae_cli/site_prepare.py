"""`lungmae site prepare`: index, check and preprocess this site's DICOM/NIfTI into its cache.

Settings come from ``site.yaml`` (``--config``); ``--input``, ``--cache``, ``--labels`` and ``--workers``
override it. Prints accepted/rejected counts and each rejection reason with its count; the full per-series
list is ``<cache>/manifest.csv`` and the shareable summary ``<cache>/datacard.json``. Exits 1 when no
series was accepted.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae site prepare`."""
    parser.add_argument("--config", type=Path, default=None, help="site.yaml (settings; flags below override it)")
    parser.add_argument("--input", type=Path, default=None, help="DICOM export / NIfTI folder (data.input)")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder to write (data.cache)")
    parser.add_argument("--labels", type=Path, default=None, help="labels CSV: patient_id,label (data.labels)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (data.workers, default 2)")
    parser.add_argument("--classes", default=None,
                        help="the federation's class list, comma-separated, in label order (data.classes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in logs)")


def run(args: argparse.Namespace) -> int:
    """Prepare the cache and print the summary."""
    from client.prepare import prepare_site
    from client.site_config import SiteConfig, load_site_config

    cfg = load_site_config(args.config) if args.config is not None else SiteConfig(source="command line")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if classes is not None:
        cfg = cfg.with_data(classes=tuple(classes))  # validated like site.yaml's data: classes
    report = prepare_site(cfg, input_dir=args.input, cache_dir=args.cache, labels=args.labels,
                          workers=args.workers, progress=not args.no_progress)
    print(report.summary())
    if report.accepted == 0:
        print("No series was accepted: nothing to train on. See the reasons above and manifest.csv.")
        return 1
    return 0
