"""In-process FedAvg over the same local-training code a site runs (no Flower runtime, no Ray).

``lungmae simulate`` runs each round's local training through Flower's simulation engine (Ray, ~30 s to
start). The experiment needs dozens of federated runs per seed, so it calls the very functions a site's
``ClientApp`` calls (:func:`lungmae_core.train.train_mae`, :func:`~lungmae_core.train.train_classifier`)
for each site in turn, in this process, and averages the resulting weights with an example-weighted mean
(FedAvg). Each round's local training follows one global warmup + cosine curve
(:class:`~lungmae_core.train.WarmupCosine` segment ``[r/R, (r+1)/R]``) with a fresh local AdamW, as a
site does. What this leaves out of Flower's runtime: message serialisation, the wire checks and DP. The
wire's compression can be put back with ``codec`` (:class:`lungmae_core.update_codec.UpdateCodec`: each
site loads the global as sent, and its update is encoded and decoded as a deployed site's is, with error
feedback for the lossy encodings), to measure what a compression costs in accuracy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lungmae_core.config import TrainConfig
from lungmae_core.train import WarmupCosine, class_weights_from_labels, train_classifier, train_mae

__all__ = ["ArrayDataset", "fedavg", "federated_mae", "federated_classifier", "centralized_classifier",
           "predict"]

logger = logging.getLogger(__name__)


class ArrayDataset(Dataset[dict[str, Any]]):
    """Items ``{"image", "lung_mask", "label"}`` of rows ``index`` of in-memory arrays (no copy of the data)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None):
        self.images, self.masks = images, masks
        self.index = np.arange(len(images)) if index is None else np.asarray(index, dtype=np.int64)
        self.labels = np.asarray(labels)[self.index]

    def __len__(self) -> int:
        return int(len(self.index))

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.index[i])
        return {"image": torch.from_numpy(np.array(self.images[j], dtype=np.float32)),
                "lung_mask": torch.from_numpy(self.masks[j].astype(np.float32)), "label": int(self.labels[i])}


def fedavg(states: list[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of state dicts (FedAvg); integer buffers are taken from the first state."""
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        if not torch.is_floating_point(ref):
            out[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights, strict=False):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def federated_mae(mae: torch.nn.Module, sites: list[Dataset[Any]], cfg: TrainConfig, *, rounds: int, seed: int,
                  device: torch.device, codec: Any = None) -> list[dict[str, float]]:
    """FedAvg MAE pretraining over ``sites`` (labels unused): ``rounds`` rounds of ``cfg.max_steps`` local steps.

    ``codec``: an optional :class:`~lungmae_core.update_codec.UpdateCodec` (the wire's compression).
    """
    global_state = _snapshot(mae)
    history = []
    for r in range(rounds):
        states, weights, losses = [], [], []
        for i, ds in enumerate(sites):
            received = codec.received(global_state) if codec is not None else global_state
            mae.load_state_dict(received)
            stats = train_mae(mae, ds, cfg, device=device, seed=seed * 100_003 + r * 101 + i,
                              lr_schedule=WarmupCosine(cfg.warmup_frac, r / rounds, (r + 1) / rounds))
            states.append(_snapshot(mae) if codec is None else
                          codec.site_update(i, _snapshot(mae), received, global_state))
            weights.append(len(ds))  # type: ignore[arg-type]
            losses.append(stats["loss_lung"])
        global_state = fedavg(states, weights)
        history.append({"round": r + 1, "loss_lung": float(np.average(losses, weights=weights))})
        logger.info("federated MAE round %d/%d: lung loss %.4f", r + 1, rounds, history[-1]["loss_lung"])
    mae.load_state_dict(global_state)
    return history


def federated_classifier(clf: torch.nn.Module, sites: list[ArrayDataset], cfg: TrainConfig, *, rounds: int, seed: int,
                         device: torch.device, num_classes: int, codec: Any = None) -> None:
    """FedAvg fine-tuning (full or linear probe, per ``cfg``) over labelled ``sites``, in place.

    ``codec``: an optional :class:`~lungmae_core.update_codec.UpdateCodec` (the wire's compression).
    """
    global_state = _snapshot(clf)
    for r in range(rounds):
        states, weights = [], []
        for i, ds in enumerate(sites):
            received = codec.received(global_state) if codec is not None else global_state
            clf.load_state_dict(received)
            train_classifier(clf, ds, cfg, class_weights=class_weights_from_labels(ds.labels, num_classes),
                             device=device, seed=seed * 100_003 + r * 101 + i,
                             lr_schedule=WarmupCosine(cfg.warmup_frac, r / rounds, (r + 1) / rounds))
            states.append(_snapshot(clf) if codec is None else
                          codec.site_update(i, _snapshot(clf), received, global_state))
            weights.append(len(ds))
        global_state = fedavg(states, weights)
    clf.load_state_dict(global_state)


def centralized_classifier(clf: torch.nn.Module, data: ArrayDataset, cfg: TrainConfig, *, steps: int, seed: int,
                           device: torch.device, num_classes: int) -> None:
    """One training run of ``steps`` steps on pooled data: one AdamW and one warmup + cosine curve."""
    import dataclasses

    train_classifier(clf, data, dataclasses.replace(cfg, max_steps=steps),
                     class_weights=class_weights_from_labels(data.labels, num_classes), device=device, seed=seed)


@torch.no_grad()
def predict(clf: torch.nn.Module, images: np.ndarray, masks: np.ndarray, *, device: torch.device,
            batch_size: int = 16) -> np.ndarray:
    """Class probabilities ``(N, K)`` of a classifier on in-memory cubes."""
    was = clf.training
    clf.to(device).eval()
    out = []
    needs_mask = bool(getattr(clf, "needs_lung_mask", False))
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start:start + batch_size], np.float32)).to(device)
        m = torch.from_numpy(masks[start:start + batch_size].astype(np.float32)).to(device)
        logits = clf(x, m) if needs_mask else clf(x)
        out.append(logits.float().softmax(dim=1).cpu().numpy())
    clf.train(was)
    return np.concatenate(out)


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy (each arm starts from the same weights without retraining them)."""
    return copy.deepcopy(model)
