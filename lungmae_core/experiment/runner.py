"""`lungmae experiment`: every arm on the same sites, splits and seeds; pretraining once per seed.

Primary endpoint (stated before any run): balanced accuracy of federated MAE -> fine-tune minus federated
from scratch at k = 8 labelled scans per class per site, seed mean, with a paired 95% bootstrap interval
over test patients.

Per seed: one federated MAE (every site, labelled and unlabelled, labels unused) and one centralized MAE on
the pooled scans, both reused for every k and arm (pretraining reads no label). Then per k, on the same
nested labelled subsets: federated MAE -> fine-tune and -> linear probe, federated scratch (same rounds;
and compute-matched: as many local steps as pretraining plus fine-tuning, at ``compute_matched_ks``),
centralized MAE -> fine-tune, each labelled site alone (scratch), a random-init linear probe, the
``mask_compare`` MAE -> fine-tune at ``mask_compare_ks``, and the two feature baselines. Fine-tuning turns
augmentation off: a flip of the head-foot axis would swap apical and basal disease, i.e. the label.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lungmae_core.config import TINY_INPUT_WINDOWS, ModelConfig, TrainConfig, to_mapping
from lungmae_core.experiment.data import ExperimentData, PhantomPlan, SiteData, labelled_subset
from lungmae_core.experiment.federation import (
    ArrayDataset,
    centralized_classifier,
    federated_classifier,
    federated_mae,
    predict,
)
from lungmae_core.heads import ILDClassifier, transfer_encoder
from lungmae_core.model import build_mae
from lungmae_core.train import WarmupCosine, evaluate_mae, train_mae

__all__ = ["Profile", "PROFILES", "ENDPOINT", "run_experiment"]

logger = logging.getLogger(__name__)

ENDPOINT = {"arm": "fed-mae-ft", "versus": "fed-scratch", "k": 8, "metric": "balanced_accuracy",
            "statement": "balanced accuracy of federated MAE -> fine-tune minus federated scratch at k = 8 "
                         "labelled scans per class per site (seed mean; paired 95% bootstrap over test patients)"}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything a run's cost depends on."""

    name: str
    plan: PhantomPlan
    model: ModelConfig
    ks: tuple[int, ...]
    seeds: int
    pre_rounds: int
    pre_local_steps: int
    ft_rounds: int
    ft_local_steps: int
    batch_size: int
    pre_lr: float = 1.5e-3
    ft_lr: float = 5e-4
    lp_lr: float = 5e-3
    layer_decay: float = 0.75
    compute_matched_ks: tuple[int, ...] = (8,)
    mask_compare: float | None = 0.75
    mask_compare_ks: tuple[int, ...] = (8,)
    n_boot: int = 1000
    norm_pix: bool = False


def _model(name: str, size: int, patch: int, dim: int, depth: int, heads: int, dec: int, dec_depth: int) -> ModelConfig:
    return ModelConfig(name=name, img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                       mlp_dim=4 * dim, decoder_embed_dim=dec, decoder_depth=dec_depth, decoder_num_heads=4,
                       decoder_mlp_dim=4 * dec, mask_ratio=0.6, input_windows=TINY_INPUT_WINDOWS, stem="conv")


PROFILES: dict[str, Profile] = {
    # Seconds on a laptop: checks that every arm runs and every output is written (tests, first try).
    # (k = 8 is among its ks so that the endpoint's paired difference is computed and written too.)
    "tiny": Profile("tiny", PhantomPlan(labelled_sites=2, unlabelled_sites=1, k_max=8, test_per_class=2,
                                        heldout_per_class=2, unlabelled_per_site=4, size=32, shape_scale=0.35),
                    _model("exp-tiny", 32, 8, 64, 2, 2, 64, 1), ks=(4, 8), seeds=1, pre_rounds=2,
                    pre_local_steps=1, ft_rounds=2, ft_local_steps=1, batch_size=4, compute_matched_ks=(8,),
                    mask_compare_ks=(8,), n_boot=50),
    # <= 60 min on 2 quiet CPU cores is the aim (docs/results.md has the measured wall time and load). 32^3
    # cubes (64 tokens of 8^3), a 96-wide ViT and batches of 8: a step costs ~0.04 s on 2 quiet cores, so
    # every arm can take the ~200 sequential steps federated scratch needs to fit its training labels at
    # k = 8 (train balanced accuracy 0.97 at 40 rounds x 5 local steps; 0.61 at 20 x 5; chance at 10 x 4).
    # Fixed on 7 Dec 2026 from the first runs on data seed 0 (docs/results.md, "How the recipe was chosen"):
    # 16 local MAE steps a round (4 left the MAE at the average patch's L1) and fine-tuning at lr 1.5e-3
    # without layer decay in every full fine-tuning arm (at 5e-4 with decay 0.75 the pretrained encoder
    # did not fit its training labels in 200 steps).
    "quick": Profile("quick", PhantomPlan(labelled_sites=3, unlabelled_sites=2, k_max=32, test_per_class=6,
                                          heldout_per_class=8, unlabelled_per_site=48, size=32, shape_scale=0.6),
                     _model("exp-quick", 32, 8, 96, 4, 4, 64, 1), ks=(4, 8, 16, 32), seeds=3, pre_rounds=40,
                     pre_local_steps=16, ft_rounds=40, ft_local_steps=5, batch_size=8, pre_lr=3e-3, ft_lr=1.5e-3,
                     layer_decay=1.0),
    # One GPU: native-resolution phantoms, 64^3 cubes, a wider and deeper ViT, longer schedules, 5 seeds.
    "gpu": Profile("gpu", PhantomPlan(labelled_sites=4, unlabelled_sites=2, k_max=32, test_per_class=10,
                                      heldout_per_class=12, unlabelled_per_site=96, size=64, shape_scale=1.0),
                   _model("exp-gpu", 64, 8, 256, 6, 8, 192, 3), ks=(4, 8, 16, 32), seeds=5, pre_rounds=100,
                   pre_local_steps=5, ft_rounds=20, ft_local_steps=5, batch_size=8, compute_matched_ks=(4, 8, 16, 32),
                   mask_compare_ks=(4, 8, 16, 32), n_boot=2000),
}


def _ft_cfg(p: Profile, mode: str, lr: float, layer_decay: float, steps: int) -> TrainConfig:
    return TrainConfig(lr=lr, weight_decay=0.05, warmup_frac=0.1, max_steps=steps, batch_size=p.batch_size,
                       flip_p=0.0, rot90_p=0.0, finetune_mode=mode, layer_decay=layer_decay)


def _new_classifier(cfg: ModelConfig, num_classes: int, seed: int,
                    encoder_from: torch.nn.Module | None) -> ILDClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = ILDClassifier(cfg, num_classes, pooling="lung")
    if encoder_from is not None:
        transfer_encoder(encoder_from, clf)
    return clf


def _pretrain(p: Profile, cfg: ModelConfig, data: ExperimentData, seed: int, device: torch.device,
              federated: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One MAE for the seed: FedAvg over every site, or one centralized run with the same number of steps."""
    start = time.perf_counter()
    mae = build_mae(cfg, seed=seed)
    sites: list[Dataset[Any]] = [ArrayDataset(s.images, s.masks, np.full(len(s), -1)) for s in data.sites]
    tcfg = TrainConfig(lr=p.pre_lr, weight_decay=0.05, warmup_frac=0.1, max_steps=p.pre_local_steps,
                       batch_size=p.batch_size, norm_pix_target=p.norm_pix)
    total_steps = p.pre_rounds * p.pre_local_steps * len(sites)
    if federated:
        history = federated_mae(mae, sites, tcfg, rounds=p.pre_rounds, seed=seed, device=device)
    else:
        pooled = ArrayDataset(np.concatenate([s.images for s in data.sites]),
                              np.concatenate([s.masks for s in data.sites]), np.full(sum(map(len, data.sites)), -1))
        stats = train_mae(mae, pooled, dataclasses.replace(tcfg, max_steps=total_steps), device=device, seed=seed,
                          lr_schedule=WarmupCosine(tcfg.warmup_frac))
        history = [{"round": 1, "loss_lung": stats["loss_lung"]}]
    test = ArrayDataset(data.test_images, data.test_masks, data.test_labels)
    recon = evaluate_mae(mae, test, device=device, seed=seed, batch_size=p.batch_size, norm_pix_target=p.norm_pix)
    recon.update(final_train_loss_lung=history[-1]["loss_lung"], steps=total_steps,
                 seconds=time.perf_counter() - start, mask_ratio=cfg.mask_ratio, norm_pix=p.norm_pix)
    logger.info("%s MAE (mask %.2f): test masked-lung L1 %.4f vs average-patch %.4f (%.0f s)",
                "federated" if federated else "centralized", cfg.mask_ratio, recon["l1_masked_lung"],
                recon["baseline_l1_masked_lung"], recon["seconds"])
    return mae, recon


def _arms_for_k(p: Profile, cfg: ModelConfig, data: ExperimentData, k: int, seed: int, device: torch.device,
                maes: dict[str, Any], part: str = "all") -> Iterator[tuple[str, np.ndarray]]:
    """``(arm, test probabilities)`` of the arms at ``k`` for one seed, the endpoint's two arms first.

    ``part``: ``"endpoint"`` (only those two), ``"rest"`` (every other arm) or ``"all"``.
    ``maes["central"]`` may be a callable that pretrains the centralized MAE on first use (so an
    interrupted run has the endpoint before the centralized pretraining).
    """
    n_cls = len(data.class_names)
    labelled = data.labelled_sites
    subsets = [labelled_subset(s, k, seed, n_cls) for s in labelled]
    site_sets = [ArrayDataset(s.images, s.masks, s.labels, idx) for s, idx in zip(labelled, subsets, strict=False)]
    pooled = ArrayDataset(np.concatenate([s.images[i] for s, i in zip(labelled, subsets, strict=False)]),
                          np.concatenate([s.masks[i] for s, i in zip(labelled, subsets, strict=False)]),
                          np.concatenate([s.labels[i] for s, i in zip(labelled, subsets, strict=False)]))
    ft = _ft_cfg(p, "full", p.ft_lr, p.layer_decay, p.ft_local_steps)
    scratch = _ft_cfg(p, "full", p.ft_lr, 1.0, p.ft_local_steps)
    lp = _ft_cfg(p, "linear-probe", p.lp_lr, 1.0, p.ft_local_steps)
    init_seed = seed * 7919 + 1

    def fed(name: str, clf: torch.nn.Module, tcfg: TrainConfig, rounds: int) -> tuple[str, np.ndarray]:
        t = time.perf_counter()
        federated_classifier(clf, site_sets, tcfg, rounds=rounds, seed=seed, device=device, num_classes=n_cls)
        logger.info("seed %d k %d %s: %.0f s", seed, k, name, time.perf_counter() - t)
        return name, predict(clf, data.test_images, data.test_masks, device=device)

    if part != "rest":
        yield fed("fed-mae-ft", _new_classifier(cfg, n_cls, init_seed, maes["fed"]), ft, p.ft_rounds)
        yield fed("fed-scratch", _new_classifier(cfg, n_cls, init_seed, None), scratch, p.ft_rounds)
    if part == "endpoint":
        return
    yield from _baselines(data, labelled, subsets, n_cls).items()
    yield fed("fed-mae-lp", _new_classifier(cfg, n_cls, init_seed, maes["fed"]), lp, p.ft_rounds)
    yield fed("random-init-lp", _new_classifier(cfg, n_cls, init_seed, None), lp, p.ft_rounds)
    steps = p.ft_rounds * p.ft_local_steps
    for site, ds in zip(labelled, site_sets, strict=False):
        clf = _new_classifier(cfg, n_cls, init_seed, None)
        centralized_classifier(clf, ds, scratch, steps=steps, seed=seed, device=device, num_classes=n_cls)
        yield f"local-{site.name}", predict(clf, data.test_images, data.test_masks, device=device)
    if not isinstance(maes["central"], torch.nn.Module):  # pretrain it on first use
        maes["central"] = maes["central"]()
    clf = _new_classifier(cfg, n_cls, init_seed, maes["central"])
    centralized_classifier(clf, pooled, ft, steps=steps * len(labelled), seed=seed, device=device, num_classes=n_cls)
    yield "central-mae-ft", predict(clf, data.test_images, data.test_masks, device=device)
    if k in p.compute_matched_ks:
        pre_steps = p.pre_rounds * p.pre_local_steps * len(data.sites)
        extra = math.ceil(pre_steps / (len(labelled) * p.ft_local_steps))
        yield fed("fed-scratch-compute-matched", _new_classifier(cfg, n_cls, init_seed, None), scratch,
                  p.ft_rounds + extra)


def _baselines(data: ExperimentData, labelled: list[SiteData], subsets: list[np.ndarray], n_cls: int
               ) -> dict[str, np.ndarray]:
    """Both feature baselines, fitted on the pooled labelled subsets (a centralized reference)."""
    from lungmae_core.experiment.baselines import features_of, fit_logistic

    train_pairs = [(s.images[i], s.masks[i]) for s, idx in zip(labelled, subsets, strict=False) for i in idx]
    y = np.concatenate([s.labels[idx] for s, idx in zip(labelled, subsets, strict=False)])
    test_pairs = list(zip(data.test_images, data.test_masks, strict=False))
    out = {}
    for kind in ("histogram", "zone-texture"):
        model = fit_logistic(features_of(kind, train_pairs), y, n_cls)
        out[f"baseline-{kind}"] = model.predict_proba(features_of(kind, test_pairs))
    return out


def run_experiment(profile: Profile, data: ExperimentData, outdir: str | Path, *, device: torch.device,
                   seeds: int | None = None, on_seed_done: Any = None) -> dict[str, Any]:
    """Run every arm for every seed and k; ``on_seed_done(results)`` is called after each seed (partial output).

    Returns:
        ``{"profile", "endpoint", "predictions": {arm: {k: [probs per seed]}}, "reconstruction": [...],
        "seconds"}`` (summaries and files are made by :mod:`lungmae_core.experiment.report`).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cfg = profile.model
    n_seeds = seeds or profile.seeds
    start = time.perf_counter()
    results: dict[str, Any] = {"profile": profile, "endpoint": ENDPOINT, "predictions": {}, "reconstruction": [],
                               "seconds": 0.0, "seeds_done": 0, "maes": {}}
    maes_of: dict[int, dict[str, Any]] = {}

    def seed_maes(seed: int) -> dict[str, Any]:
        """The seed's federated MAE (pretrained now) and its centralized one (pretrained on first use)."""
        if seed not in maes_of:
            maes: dict[str, Any] = {}
            maes["fed"], recon_fed = _pretrain(profile, cfg, data, seed, device, federated=True)
            results["reconstruction"].append({"seed": seed, "mae": "federated", **recon_fed})

            def central(seed: int = seed) -> torch.nn.Module:
                mae, recon = _pretrain(profile, cfg, data, seed, device, federated=False)
                results["reconstruction"].append({"seed": seed, "mae": "centralized", **recon})
                return mae

            maes["central"] = central
            maes_of[seed] = maes
            results["maes"] = maes  # the latest seed's, for the reconstruction figure
        return maes_of[seed]

    def record(arm: str, k: int, probs: np.ndarray) -> None:
        results["predictions"].setdefault(arm, {}).setdefault(k, []).append(probs)

    # Phase 1: the primary endpoint's two arms for every seed, so an interrupted run has it with every seed.
    k_ep = int(ENDPOINT["k"])  # type: ignore[call-overload]
    if k_ep in profile.ks:
        for seed in range(1, n_seeds + 1):
            for arm, probs in _arms_for_k(profile, cfg, data, k_ep, seed, device, seed_maes(seed), "endpoint"):
                record(arm, k_ep, probs)
            results["seconds"] = time.perf_counter() - start
            logger.info("endpoint pair of seed %d done after %.0f s", seed, results["seconds"])
            if on_seed_done is not None:
                on_seed_done(results)
    # Phase 2: every other arm, seed by seed, the endpoint's k first; outputs after every k and seed.
    for seed in range(1, n_seeds + 1):
        maes = seed_maes(seed)
        for k in sorted(profile.ks, key=lambda v: (v != k_ep, v)):
            for arm, probs in _arms_for_k(profile, cfg, data, k, seed, device, maes,
                                          "rest" if k == k_ep else "all"):
                record(arm, k, probs)
            results["seconds"] = time.perf_counter() - start
            if on_seed_done is not None:
                on_seed_done(results)
        if profile.mask_compare is not None:  # the other mask ratio, fine-tuned at mask_compare_ks
            other = dataclasses.replace(cfg, mask_ratio=profile.mask_compare)
            mae_other, recon_other = _pretrain(profile, other, data, seed, device, federated=True)
            results["reconstruction"].append({"seed": seed, "mae": f"federated-mask{profile.mask_compare:g}",
                                              **recon_other})
            for k in profile.mask_compare_ks:
                record(f"fed-mae-ft-mask{profile.mask_compare:g}", k,
                       _mask_compare_arm(profile, cfg, data, k, seed, device, mae_other))
        results["seeds_done"] = seed
        results["seconds"] = time.perf_counter() - start
        logger.info("seed %d of %d done after %.0f s", seed, n_seeds, results["seconds"])
        if seed < n_seeds:  # free the seed's MAEs (the last one's draws the reconstruction figure)
            maes_of[seed]["central"] = maes_of[seed]["fed"] = None
        if on_seed_done is not None:
            on_seed_done(results)
    return results


def _mask_compare_arm(p: Profile, cfg: ModelConfig, data: ExperimentData, k: int, seed: int, device: torch.device,
                      mae: torch.nn.Module) -> np.ndarray:
    """Federated fine-tuning, as ``fed-mae-ft``, from an MAE pretrained with the other mask ratio."""
    n_cls = len(data.class_names)
    site_sets = [ArrayDataset(s.images, s.masks, s.labels, labelled_subset(s, k, seed, n_cls))
                 for s in data.labelled_sites]
    clf = _new_classifier(cfg, n_cls, seed * 7919 + 1, mae)
    federated_classifier(clf, site_sets, _ft_cfg(p, "full", p.ft_lr, p.layer_decay, p.ft_local_steps),
                         rounds=p.ft_rounds, seed=seed, device=device, num_classes=n_cls)
    return predict(clf, data.test_images, data.test_masks, device=device)


def profile_summary(profile: Profile) -> dict[str, Any]:
    """The profile as JSON-ready values."""
    out = {f.name: getattr(profile, f.name) for f in dataclasses.fields(profile)}
    out["plan"] = dataclasses.asdict(profile.plan)
    out["model"] = to_mapping(profile.model)
    return out
