"""The cross-site step of a run: local models from the consenting sites, every model scored at every site.

Runs after the final evaluation (``server.schedule`` step ``cross-site``). The sites whose policy shares one
(``share-local-model``, announced in their query answer) fine-tune a local copy of the final global
classifier on their own train split and send it back as an update relative to the global model;
:meth:`server.strategy.PhaseStrategy.local_models` validates each like a training update (replay ... norm).
Each local model waits on disk (a private temporary folder in the run's spool directory, removed at the
end) until its turn, so the server holds one at a time. Then every site with a test split scores each local
model, one evaluate message per (model, site), so no message carries more than one model. The global
model's row is the final evaluation's (the same weights).

Nothing here can stop the run: a site that does not share has no row (``notes.not_shared``), a local model
that fails or is dropped leaves its row null (``notes.models``), an evaluation refused (e.g. the site's
``max-evaluations-per-run``), failed or dropped leaves its cell null (``notes.cells``). The result is the
``final.cross_site`` structure of :func:`server.cross_site.build_cross_site`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from lungmae_core.contract import CROSS_SITE, EVALUATE
from server.cross_site import CROSS_SITE_METRICS, GLOBAL_MODEL, build_cross_site
from server.sites import SiteRegistry
from server.strategy import PhaseStrategy

__all__ = ["MATRIX_METRICS", "SPOOL_PREFIX", "cross_site_matrix", "run_cross_site"]

log = logging.getLogger(__name__)

#: Plain accuracy besides balanced accuracy and ROC AUC: it stays defined on a test split that lacks a class.
MATRIX_METRICS: tuple[str, ...] = (*CROSS_SITE_METRICS, "accuracy")
#: Name prefix of the folder the local models wait in (a server killed mid-step leaves one behind).
SPOOL_PREFIX = "cross-site-"


def cross_site_matrix(sites: SiteRegistry, scores: Mapping[tuple[str, str], Mapping[str, Any]],
                      models: list[str], notes: Mapping[str, Any]) -> dict[str, Any]:
    """``final.cross_site`` from the scores; the columns are the sites that can score a test split (plus any
    that scored although they no longer can), each with its policy's ``min-count`` from its query answer."""
    data_sites = sorted(s.name for s in sites.values() if s.can_serve(CROSS_SITE, EVALUATE))
    data_sites += sorted({site for _, site in scores} - set(data_sites))
    minimum = {s.name: s.min_count for s in sites.values() if s.name in data_sites}
    matrix = build_cross_site(scores, models=models, data_sites=data_sites, min_count=minimum,
                              metrics=MATRIX_METRICS)
    matrix["notes"] = dict(notes)
    return matrix


def run_cross_site(strategy: PhaseStrategy, grid: Grid, sites: SiteRegistry, weights: dict[str, torch.Tensor],
                   global_scores: Mapping[str, Mapping[str, Any]],
                   timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Gather the local models and score them everywhere.

    Args:
        strategy: the ``cross-site`` phase's strategy (its round config: local epochs, lr, split ``test``).
        grid: the Flower grid.
        sites: the registry, already queried.
        weights: the final global classifier.
        global_scores: the final evaluation's per-site metrics (the global row).
        timeout: seconds each exchange waits for replies.

    Returns:
        ``(final.cross_site, drops)``: the matrix (with ``local_training``, ``bytes``, ``duration_s``) and
        every reply dropped by a check, for the audit log.
    """
    t0 = time.perf_counter()
    scores: dict[tuple[str, str], Mapping[str, Any]] = {(GLOBAL_MODEL, s): m for s, m in global_scores.items()}
    notes: dict[str, Any] = {"models": {}, "cells": [], "not_shared": {}}
    for info in sites.values():
        if not info.error and info.num_labelled_train > 0 and not info.share_local_model:
            notes["not_shared"][info.name] = "the site's policy does not share a local model (share-local-model)"
    cfg = strategy.round_config
    # every local model waits on disk in a private folder until it is scored: one in memory at a time
    with tempfile.TemporaryDirectory(prefix=SPOOL_PREFIX, dir=strategy.spool_dir) as spool:
        local, train = strategy.local_models(grid, weights, cfg, timeout, Path(spool))
        for f in train.failed:
            notes["models"][f["site"]] = f"no local model: {f['reason']}"
        for r in train.rejected:
            notes["models"][r.site] = f"local model dropped by the {r.check} check: {r.reason}"
        models = [GLOBAL_MODEL] + sorted(set(train.sampled))
        moved = {"down": train.bytes_down, "up": train.bytes_up}
        drops = [dataclasses.asdict(r) for r in train.rejected]
        for name in models[1:]:
            if name not in local:
                notes["models"].setdefault(name, "no local model came back")
                continue
            path = local.pop(name)
            model = torch.load(path, weights_only=True)
            path.unlink()
            report = strategy.evaluate(grid, model, cfg, timeout)
            del model
            moved["down"] += report.bytes_down
            moved["up"] += report.bytes_up
            drops += [dataclasses.asdict(r) for r in report.rejected]
            for site, m in report.sites.items():
                scores[(name, site)] = m
            for f in report.failed:
                notes["cells"].append({"model": name, "data_site": f["site"], "reason": f["reason"]})
            for r in report.rejected:
                notes["cells"].append({"model": name, "data_site": r.site, "reason": f"{r.check} check: {r.reason}"})
    matrix = cross_site_matrix(sites, scores, models, notes)
    matrix["local_training"] = train.sites
    matrix["bytes"] = moved
    matrix["duration_s"] = round(time.perf_counter() - t0, 3)
    log.info("cross-site: %d models x %d sites in %.1f s (%d not shared, %d rows empty, %d cells refused)",
             len(models), len(matrix["data_sites"]), matrix["duration_s"], len(notes["not_shared"]),
             len(notes["models"]), len(notes["cells"]))
    return matrix, drops
