"""Centralized pipeline behind ``lungmae train``: MAE pretraining, then ILD fine-tuning, on phantoms or a cache.

This is the main job until the federation runs, and later its centralized baseline: the same
``train_mae``/``train_classifier`` calls a site makes, on all the data in one place. Scans are split by
patient into train/val/test; the MAE pretrains on train + val scans (labels unused), the classifier
fine-tunes on train, the epoch with the best validation balanced accuracy is kept, and the held-out test
split is reported (the public code reported on the split it selected on). ``pretrain=False`` gives the
from-scratch baseline that pretraining must beat.

Outputs in ``workdir``: ``metrics.json`` (snake_case; test results under ``"final"``), ``log.jsonl`` (one JSON
line per epoch), ``checkpoints/mae.pt`` and ``checkpoints/classifier.pt`` (nanoGPT-style dicts with
``model_args``), and ``phantoms/`` (the generated phantoms, cached so that a rerun starts at once;
:mod:`lungmae_core.centralized.data`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from lungmae_core.atomic import atomic_path, atomic_write_json, atomic_write_text
from lungmae_core.centralized.data import phantom_dataset, split_by_patient
from lungmae_core.config import ModelConfig, TrainConfig, model_config, to_mapping
from lungmae_core.heads import ILDClassifier, transfer_encoder
from lungmae_core.model import build_mae
from lungmae_core.train import (
    WarmupCosine,
    class_weights_from_labels,
    evaluate_classifier,
    evaluate_mae,
    resolve_device,
    train_classifier,
    train_mae,
)

__all__ = ["run_centralized", "save_checkpoint"]

logger = logging.getLogger(__name__)

_SELECTION_KEYS = ("balanced_accuracy", "accuracy")


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """Classification metrics without the score histogram (a federation's pooling input, not a result)."""
    return {k: v for k, v in metrics.items() if k != "score_histogram"}


def _fmt(value: float | None) -> str:
    """A metric for the log; None is undefined (a class missing from the split), never 0 or 1."""
    return "undefined" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, cfg: ModelConfig, **extra: Any) -> Path:
    """Save ``{model, model_args, **extra}`` atomically (temporary name, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "model_args": to_mapping(cfg), **extra}, tmp)
    return path


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(path, payload)


class _EpochLog:
    """Appends one JSON line per epoch to ``log.jsonl`` (as MAE's ``log.txt``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        atomic_write_text(path, "")

    def __call__(self, **fields: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(fields) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------


def run_centralized(
    *,
    workdir: str | os.PathLike[str],
    model: str | ModelConfig = "tiny",
    cache: str | os.PathLike[str] | None = None,
    scans: int = 48,
    pretrain: bool = True,
    pretrain_epochs: int = 30,
    finetune_epochs: int = 15,
    pretrain_cfg: TrainConfig | None = None,
    finetune_cfg: TrainConfig | None = None,
    num_classes: int = 4,
    device: str = "auto",
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain an MAE, fine-tune a classifier on its encoder, select on val, report test; write ``workdir``.

    Args:
        workdir: output directory (created).
        model: model config name, YAML path or ``ModelConfig``. Defaults to ``"tiny"``.
        cache: a prepared site cache (``lungmae site prepare``); ``None`` uses built-in phantoms.
        scans: number of phantoms when ``cache`` is ``None``. Defaults to 48.
        pretrain: ``False`` trains the classifier from random weights (the baseline).
        pretrain_epochs, finetune_epochs: passes over the pretraining / training split.
        pretrain_cfg, finetune_cfg: hyperparameters; default to the paper's
            (``TrainConfig.pretrain_defaults()`` / ``finetune_defaults()``) with the epochs above.
        num_classes: classes of the task. Defaults to 4 (``data.CLASS_NAMES``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... seed: seeds splits, weights, masks and shuffling.
        workers: processes generating phantoms.
        progress: tqdm bars.

    Returns:
        The ``metrics.json`` content: ``final`` (test classification metrics), ``val`` (best epoch),
        ``reconstruction`` (test-split masked L1 next to the mean-anatomy baseline), ``data``, ``config``.

    Raises:
        DatasetError, CacheError, ConfigError: for data or settings that do not fit.
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = model if isinstance(model, ModelConfig) else model_config(model)
    dev = resolve_device(device)
    pre_cfg = pretrain_cfg or TrainConfig.pretrain_defaults(epochs=pretrain_epochs)
    fine_cfg = finetune_cfg or TrainConfig.finetune_defaults(epochs=finetune_epochs)
    logger.info("model %s (%d^3, patch %d, %d tokens), device %s, seed %d, torch threads %d", cfg.name,
                cfg.img_size, cfg.patch_size, cfg.num_patches, dev, seed, torch.get_num_threads())

    # -- data
    if cache is not None:
        from lungmae_core.data import CachedVolumes

        dataset = CachedVolumes(cache, size=cfg.img_size, progress=progress)
        split_names = [r.split for r in dataset.rows] if all(r.split for r in dataset.rows) else None
        source, rejected = "cache", list[str]()
    else:
        dataset, rejected = phantom_dataset(scans, size=cfg.img_size, seed=seed, cache_dir=workdir / "phantoms",
                                            workers=workers, progress=progress)
        split_names, source = None, "phantoms"
    parts = split_by_patient(dataset, seed, split_names)
    counts = {name: len(parts[name]) for name in ("pretrain", "train", "val", "test")}
    logger.info("data: %s, %d scans (%d rejected); pretrain %d, train %d, val %d, test %d", source, len(dataset),
                len(rejected), *counts.values())
    epoch_log = _EpochLog(workdir / "log.jsonl")
    run_config = {"model": to_mapping(cfg), "pretrain": to_mapping(pre_cfg) if pretrain else None,
                  "finetune": to_mapping(fine_cfg), "seed": seed, "device": str(dev), "source": source}
    metrics: dict[str, Any] = {"config": run_config,
                               "data": {"scans": len(dataset), "rejected": len(rejected), **counts}}

    # -- pretraining: one warmup + cosine curve over all epochs, one epoch per call
    mae = build_mae(cfg, seed=seed) if pretrain else None
    if mae is not None:
        pre_state: dict[str, Any] = {}  # one AdamW for the whole run, not one per epoch
        for epoch in range(pre_cfg.epochs):
            stats = train_mae(mae, parts["pretrain"], dataclasses.replace(pre_cfg, epochs=1), device=dev,
                              seed=seed * 1000 + epoch, progress=progress, optimizer_state=pre_state,
                              lr_schedule=WarmupCosine(pre_cfg.warmup_frac, epoch / pre_cfg.epochs,
                                                       (epoch + 1) / pre_cfg.epochs))
            epoch_log(phase="pretrain", epoch=epoch + 1, **stats)
            logger.info("pretrain epoch %d/%d: loss %.4f (lung %.4f)", epoch + 1, pre_cfg.epochs, stats["loss"],
                        stats["loss_lung"])
        save_checkpoint(workdir / "checkpoints" / "mae.pt", mae, cfg, kind="mae", epochs=pre_cfg.epochs)
        recon = evaluate_mae(mae, parts["test"], device=dev, seed=seed, batch_size=pre_cfg.batch_size,
                             lung_threshold=pre_cfg.lung_threshold)
        recon["beats_baseline"] = recon["l1_masked_lung"] < recon["baseline_l1_masked_lung"]
        metrics["reconstruction"] = recon
        logger.info("test reconstruction: masked L1 %.4f (mean-anatomy baseline %.4f), lung %.4f (baseline %.4f)",
                    recon["l1_masked"], recon["baseline_l1_masked"], recon["l1_masked_lung"],
                    recon["baseline_l1_masked_lung"])
        if not recon["beats_baseline"]:
            logger.warning("the MAE's masked-lung L1 is not below the mean-anatomy baseline: it has learned little "
                           "beyond the average anatomy (pretrain longer or check the data)")
    else:
        metrics["reconstruction"] = None

    # -- fine-tuning with model selection on val
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        clf = ILDClassifier(cfg, num_classes, pooling=fine_cfg.pooling)
    if mae is not None:
        transfer_encoder(mae, clf)
    weights = class_weights_from_labels(parts["train"].labels, num_classes)
    best: tuple[tuple[float, ...], int, dict[str, Any], dict[str, torch.Tensor]] | None = None
    fine_state: dict[str, Any] = {}  # one AdamW for the whole run, not one per epoch
    for epoch in range(fine_cfg.epochs):
        stats = train_classifier(clf, parts["train"], dataclasses.replace(fine_cfg, epochs=1), class_weights=weights,
                                 device=dev, seed=seed * 1000 + epoch, progress=progress, optimizer_state=fine_state,
                                 lr_schedule=WarmupCosine(fine_cfg.warmup_frac, epoch / fine_cfg.epochs,
                                                          (epoch + 1) / fine_cfg.epochs))
        val = _scores(evaluate_classifier(clf, parts["val"], num_classes=num_classes, device=dev,
                                          batch_size=fine_cfg.batch_size))
        epoch_log(phase="finetune", epoch=epoch + 1, **stats, **{f"val_{k}": v for k, v in val.items()})
        logger.info("finetune epoch %d/%d: loss %.4f, val balanced accuracy %s, val loss %.4f", epoch + 1,
                    fine_cfg.epochs, stats["loss"], _fmt(val["balanced_accuracy"]), val["loss"])
        # an undefined score (a class missing from val) ranks below any defined one
        score = tuple(-1.0 if val[k] is None else val[k] for k in _SELECTION_KEYS) + (-val["loss"],)
        if best is None or score > best[0]:
            best = (score, epoch + 1, val, copy.deepcopy(clf.state_dict()))
    assert best is not None
    clf.load_state_dict(best[3])
    save_checkpoint(workdir / "checkpoints" / "classifier.pt", clf, cfg, kind="classifier", num_classes=num_classes,
                    pooling=fine_cfg.pooling, epoch=best[1], pretrained=pretrain)
    test = _scores(evaluate_classifier(clf, parts["test"], num_classes=num_classes, device=dev,
                                       batch_size=fine_cfg.batch_size))
    metrics.update(pretrained=pretrain, best_epoch=best[1], val=best[2], final=test,
                   seconds=time.perf_counter() - start)
    _write_json(workdir / "metrics.json", metrics)
    logger.info("test (epoch %d selected on val): accuracy %s, balanced accuracy %s, weighted F1 %s, "
                "ROC AUC %s; %.0f s in all", best[1], *(_fmt(test[k]) for k in ("accuracy", "balanced_accuracy",
                                                                             "weighted_f1", "roc_auc")),
                metrics["seconds"])
    return metrics
