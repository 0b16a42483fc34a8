"""Check the prepared caches of the sites a local simulation runs on, before any federation machinery starts.

``lungmae simulate --site a/site.yaml --site b/site.yaml`` trains on caches that ``lungmae site prepare`` wrote
earlier, possibly with other settings. A cache that is missing, half-written, stale (prepared with another
preprocessing fingerprint than the site.yaml's ``preprocess`` section) or without labels would otherwise
surface minutes later, inside a Ray worker, as a site that "cannot serve" a round. Checking here, in the
driver process, gives one error that names the site, its site.yaml and the command that fixes it.

Only the manifest, the data card and the existence of sample files are read; no volume is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from lungmae_core.errors import CacheError, SiteConfigError

__all__ = ["SiteCache", "check_site_caches"]


@dataclasses.dataclass(frozen=True)
class SiteCache:
    """What one site's cache holds (accepted scans, labelled ones in the training split)."""

    name: str
    config: Path
    accepted: int
    labelled_train: int
    labelled_test: int


def _check_one(path: Path, need_labels: bool) -> SiteCache:
    from client.site_config import load_site_config
    from lungmae_core.manifest import read_manifest

    if not path.is_file():
        raise SiteConfigError(f"Unable to use --site {path} as the file does not exist; pass a site.yaml written "
                              "by `lungmae synth` or for your own data (docs/site-data.md)")
    site = load_site_config(path)
    name = site.site.name
    fix = f"run `lungmae site prepare --config {path}`"
    cache = site.data.cache
    if cache is None:
        raise SiteConfigError(f"site '{name}' ({path}) has no 'data: cache' folder; set it, then {fix}")
    if not (cache / "manifest.csv").is_file():
        raise CacheError(f"site '{name}' ({path}) has no prepared cache: {cache / 'manifest.csv'} does not exist; "
                         f"{fix}")
    try:
        rows = [r for r in read_manifest(cache) if r.accepted]
    except CacheError as exc:
        raise CacheError(f"site '{name}' ({path}): {exc}; {fix} again") from exc
    if not rows:
        raise CacheError(f"site '{name}' ({path}): the cache {cache} has no accepted scan; read the 'reason' "
                         f"column of {cache / 'manifest.csv'}, fix the export, then {fix}")
    missing = [r for r in rows if not (cache / r.cache_file).is_file()]
    if missing:
        raise CacheError(f"site '{name}' ({path}): {len(missing)} of {len(rows)} accepted samples are missing "
                         f"from {cache / 'samples'}; {fix} again (it rebuilds what is missing)")
    card_path = cache / "datacard.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        prepared_with = card["preprocess"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CacheError(f"site '{name}' ({path}): the data card {card_path} is missing or does not say which "
                         f"preprocessing built the cache; {fix} again") from None
    if prepared_with != site.preprocess.fingerprint():
        raise CacheError(f"site '{name}' ({path}): the cache {cache} is stale: it was prepared with other "
                         f"preprocessing settings (fingerprint {str(prepared_with)[:12]}) than site.yaml's "
                         f"'preprocess' section now has ({site.preprocess.fingerprint()[:12]}); {fix} again")
    train = sum(1 for r in rows if r.label and r.split == "train")
    test = sum(1 for r in rows if r.label and r.split == "test")
    if need_labels and train == 0:
        labels = site.data.labels
        where = f"its labels file {labels}" if labels is not None else "site.yaml names no 'data: labels' file"
        raise CacheError(f"site '{name}' ({path}) has no labelled scan in its training split ({len(rows)} accepted, "
                         f"{where}), so it cannot fine-tune; add labels (patient_id,label) and {fix} again, "
                         "or leave the site out, or run with --finetune-rounds 0")
    return SiteCache(name=name, config=path, accepted=len(rows), labelled_train=train, labelled_test=test)


def check_site_caches(paths: Sequence[Path], *, need_labels: bool) -> list[SiteCache]:
    """Check every site's prepared cache; raise on the first problem, naming the site and the fix.

    Args:
        paths: the ``site.yaml`` files, one per virtual SuperNode.
        need_labels: the run fine-tunes, so every site needs labelled training scans.

    Returns:
        One :class:`SiteCache` per path, in order.

    Raises:
        SiteConfigError: a path that is not a readable site.yaml, a site without a cache folder, or two
            sites with the same name (the server tells sites apart by name).
        CacheError: a missing, incomplete or stale cache, or one without labels when ``need_labels``.
    """
    if not paths:
        raise SiteConfigError("no --site given: pass one site.yaml per site")
    found = [_check_one(Path(p), need_labels) for p in paths]
    seen: dict[str, Path] = {}
    for item in found:
        if item.name in seen:
            raise SiteConfigError(f"sites {seen[item.name]} and {item.config} are both named '{item.name}'; give "
                                  "each site.yaml its own 'site: name'")
        seen[item.name] = item.config
    return found
