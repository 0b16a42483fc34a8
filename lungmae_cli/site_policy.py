"""`lungmae site policy --config site.yaml`: print the policy this site enforces, for the hospital's IT to review.

The policy (``site.yaml`` ``policy:``, with the defaults for keys left out) is what the site agrees to do
whatever the coordinator asks: the site checks every request against it before any work and refuses, naming
the key, anything outside it. Nothing is changed and nothing is contacted.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae site policy`."""
    parser.add_argument("--config", type=Path, required=True, help="the site's site.yaml")
    parser.add_argument("--json", action="store_true", help="print the policy as JSON")


def run(args: argparse.Namespace) -> int:
    """Load site.yaml and print the effective policy."""
    import json

    from client.policy import effective_policy
    from client.site_config import load_site_config

    site = load_site_config(args.config)
    policy = effective_policy(site)
    if args.json:
        print(json.dumps(policy, indent=1))
        return 0
    print(f"Policy of site {site.site.name!r} ({args.config}); every request outside it is refused:")
    width = max(len(k) for k in policy)
    for key, value in policy.items():
        shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            shown = f"{value:,}"
        print(f"  {key:<{width}}  {shown}")
    return 0
