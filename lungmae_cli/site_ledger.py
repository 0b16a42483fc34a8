"""``lungmae site ledger show|reset``: read a site's privacy ledger, or start a new one on purpose.

``show`` prints the spent and remaining epsilon (at the ledger's delta, per pseudonymous patient) in total
and per federation run and phase, the refusals and the resets. ``reset --reason ...`` archives the ledger,
records who, when and why in the site's privacy journal, and lets the next DP round start a new ledger: the
only way past the refusal a lost ledger causes. Both work on the site's own files; nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``show`` or ``reset``, the site.yaml, and for ``reset`` the reason."""
    parser.add_argument("action", choices=("show", "reset"), help="show the ledger, or reset it (needs --reason)")
    parser.add_argument("--config", type=Path, required=True, help="the site's site.yaml")
    parser.add_argument("--reason", default=None,
                        help="reset only: why, and who agreed (recorded in the privacy journal)")
    parser.add_argument("--json", action="store_true", help="show only: print the summary as JSON")


def _ledger(site: Any) -> Any:
    from client.ledger import PrivacyLedger
    from client.privacy_gate import WITNESS_NAME

    dp = site.privacy
    path = dp.ledger if dp.ledger is not None else Path(site.site.state_dir) / "privacy-ledger.json"
    budget = float(dp.epsilon) if dp.enabled and dp.epsilon else _recorded_budget(path)
    witness = [Path(site.data.cache) / WITNESS_NAME] if site.data.cache is not None else []
    return PrivacyLedger(path, budget_epsilon=budget, delta=None, site=site.site.name, witnesses=witness)


def _recorded_budget(path: Path) -> float:
    """The budget a ledger last recorded (for ``show`` on a site whose site.yaml has DP off); 1.0 if none."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("budget_epsilon")
    except (OSError, ValueError, AttributeError):
        return 1.0
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0


def _print_summary(summary: dict[str, Any], enabled: bool) -> None:
    out = sys.stdout
    print(f"privacy ledger {summary['ledger']}" + ("" if summary["exists"] else " (none yet)"), file=out)
    if not enabled:
        print("privacy.enabled is false in site.yaml: this site does not train with DP", file=out)
    if summary["evidence"]:
        print("MISSING while the site shows earlier DP work: " + "; ".join(summary["evidence"]), file=out)
        print("DP training is refused until: lungmae site ledger reset --config site.yaml --reason '...'", file=out)
    delta = summary["delta"]
    print(f"unit: {summary['unit']}   delta: {'not fixed yet' if delta is None else f'{delta:g}'}", file=out)
    print(f"epsilon spent {summary['spent']:.3f} of {summary['budget']:.3f}; remaining {summary['remaining']:.3f}",
          file=out)
    if summary["groups"]:
        print(f"{'run':<22} {'phase':<10} {'rounds':>6} {'steps':>7} {'patients':>8} {'epsilon':>8}", file=out)
        for g in summary["groups"]:
            note = f"  ({g['reserved_unsettled']} reserved, counted in full)" if g["reserved_unsettled"] else ""
            print(f"{g['run'] or '-':<22} {g['phase']:<10} {g['rounds']:>6} {g['steps']:>7} {g['patients']:>8} "
                  f"{g['epsilon']:>8.3f}{note}", file=out)
        print("(per run and phase: that group's rounds composed alone; together they compose to the total)",
              file=out)
    for r in summary["refusals"]:
        print(f"refused: {r['phase']} round {r['server_round']} at {r['at']} (would be {r['epsilon_would_be']:.3f} "
              f"of {r['budget']:.3f})", file=out)
    for r in summary["resets"]:
        print(f"reset before this ledger: {r.get('at')} by {r.get('by')}: {r.get('reason')} (epsilon spent before: "
              f"{r.get('epsilon_spent_before')})", file=out)


def run(args: argparse.Namespace) -> int:
    """Show or reset the ledger of the site in ``--config``."""
    from client.site_config import load_site_config
    from lungmae_core.errors import ConfigError

    site = load_site_config(args.config)
    ledger = _ledger(site)
    if args.action == "reset":
        if not args.reason or len(args.reason.strip()) < 3:
            raise ConfigError("Unable to reset the privacy ledger without a reason; pass --reason 'why, who agreed' "
                              "(it is recorded in the site's privacy journal)")
        event = ledger.reset(reason=args.reason)
        print(f"privacy ledger {ledger.path} reset by {event['by']} at {event['at']}: archived "
              f"{event['archived'] or 'nothing (there was no ledger)'}; epsilon spent before: "
              f"{'unknown' if event['epsilon_spent_before'] is None else format(event['epsilon_spent_before'], '.3f')}."
              " The next DP round starts a new ledger.")
        return 0
    summary = ledger.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, site.privacy.enabled)
    return 0
