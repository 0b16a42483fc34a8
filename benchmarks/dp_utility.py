"""What differential privacy costs the classifier: balanced accuracy of non-private vs DP fine-tuning.

On the built-in phantoms (tiny model, CPU): one MAE is pretrained without DP, then for each seed (its own
patient split and head initialisation) the classifier is fine-tuned

* without DP, the whole model (``full``), the project's non-private default;
* without DP, only what DP fine-tuning trains (``--mode``, the site default), to separate the cost of
  freezing from the cost of noise;
* with DP-SGD (Poisson sampling per patient, clipping, secret noise) at each epsilon of ``--epsilons``,
  delta ``min(1e-5, 1/(10 N))`` for the ``N`` training patients, the noise multiplier chosen so that the
  whole fine-tuning costs exactly that epsilon (RDP accountant).

Each is scored on the seed's held-out test patients (the model after the last epoch; no selection on
validation data). The table prints mean and standard deviation over the seeds, as markdown.

``--measure-norms`` instead measures per-sample gradient norms (one scan per backward pass): of the MAE's
voxel loss at initialisation and after pretraining, and of the classifier's loss in each fine-tuning mode
with the pretrained encoder. Those medians are the clipping bounds recorded in ``lungmae_core.privacy``.

Not part of ``make test``; minutes on CPU. Run it with ``nice``::

    nice -n 10 .venv/bin/python benchmarks/dp_utility.py --workdir /tmp/dp-utility
    nice -n 10 .venv/bin/python benchmarks/dp_utility.py --workdir /tmp/dp-utility --measure-norms
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lungmae_core.centralized.data import phantom_dataset, split_by_patient  # noqa: E402
from lungmae_core.config import TrainConfig, model_config  # noqa: E402
from lungmae_core.heads import ILDClassifier, set_trainable, transfer_encoder  # noqa: E402
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1  # noqa: E402
from lungmae_core.model import build_mae, patchify3d  # noqa: E402
from lungmae_core.privacy import (  # noqa: E402
    DEFAULT_DP_FINETUNE,
    FINETUNE_CLIP,
    DPConfig,
    OpacusPrivacy,
    default_delta,
    plan_round,
)
from lungmae_core.train import (  # noqa: E402
    WarmupCosine,
    class_weights_from_labels,
    evaluate_classifier,
    train_classifier,
    train_mae,
)

log = logging.getLogger("dp_utility")
NUM_CLASSES = 4


def _pretrain(data: Any, epochs: int, seed: int, cache: Path | None = None) -> Any:
    """The non-private MAE (``cache``: reuse or keep its weights, keyed by epochs and seed)."""
    cfg = model_config("tiny")
    mae = build_mae(cfg, seed=seed)
    path = None if cache is None else cache / f"mae-tiny-e{epochs}-s{seed}-n{len(data)}.pt"
    if path is not None and path.is_file():
        mae.load_state_dict(torch.load(path, map_location="cpu"))
        return mae
    pre = TrainConfig.pretrain_defaults(epochs=1, batch_size=8, lr=1e-3)
    for epoch in range(epochs):
        train_mae(mae, data, pre, device="cpu", seed=seed * 1000 + epoch,
                  lr_schedule=WarmupCosine(pre.warmup_frac, epoch / epochs, (epoch + 1) / epochs))
    if path is not None:
        from lungmae_core.atomic import atomic_path

        with atomic_path(path) as tmp:
            torch.save(mae.state_dict(), tmp)
    return mae


def _classifier(mae: Any, seed: int) -> ILDClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        clf = ILDClassifier(mae.cfg, NUM_CLASSES)
    transfer_encoder(mae, clf)
    return clf


def _finetune(mae: Any, parts: dict[str, Any], *, seed: int, mode: str, epochs: int, batch: int, lr: float,
              epsilon: float | None, clip: float) -> dict[str, float]:
    """Fine-tune one classifier (``epsilon`` None: without DP) and score it on the test split."""
    clf = _classifier(mae, seed)
    train = parts["train"]
    weights = class_weights_from_labels(train.labels, NUM_CLASSES)
    tcfg = TrainConfig.finetune_defaults(epochs=epochs, batch_size=batch, lr=lr, finetune_mode=mode, amp="none")
    privacy, sigma = None, 0.0
    if epsilon is not None:
        n = len(train)  # one scan per phantom patient
        delta = default_delta(n)
        dp = DPConfig(enabled=True, epsilon=epsilon, target_epsilon_per_round=epsilon, max_grad_norm=clip,
                      finetune_trainable=mode)
        plan = plan_round(dp, num_samples=n, batch_size=batch, epochs=epochs, delta=delta)
        sigma = plan.noise_multiplier
        privacy = OpacusPrivacy(plan, trainable=mode)
    t0 = time.perf_counter()
    train_classifier(clf, train, tcfg, class_weights=weights, device="cpu", seed=seed, privacy=privacy)
    if privacy is not None:
        spent = privacy.epsilon(default_delta(len(train)))
        assert spent <= epsilon * 1.001, (spent, epsilon)
    test = evaluate_classifier(_strip(clf), parts["test"], num_classes=NUM_CLASSES, batch_size=8)
    return {"balanced_accuracy": float(test["balanced_accuracy"]), "sigma": sigma,
            "seconds": time.perf_counter() - t0}


def _strip(model: Any) -> Any:
    return getattr(model, "_module", model)


def _table(rows: dict[str, list[float]], reference: str) -> str:
    """Markdown: mean +- sd over seeds, the per-seed values, and the cost in points against ``reference``."""
    ref = statistics.mean(rows[reference])
    lines = ["| fine-tuning | balanced accuracy (mean +- sd) | per seed | cost vs " + reference + " (points) |",
             "|---|---|---|---|"]
    for name, values in rows.items():
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {name} | {mean:.3f} +- {sd:.3f} | {per_seed} | {100 * (ref - mean):+.1f} |")
    return "\n".join(lines)


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().double().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).sum().sqrt())


def _mae_norms(mae: Any, data: Any, count: int) -> list[float]:
    cfg, pre = mae.cfg, TrainConfig.pretrain_defaults()
    gen = torch.Generator().manual_seed(0)
    mae.train()
    norms = []
    for i in range(min(count, len(data))):
        item = data[i]
        images, lung = item["image"][None], item["lung_mask"][None]
        mae.zero_grad(set_to_none=True)
        pred, mask = mae(images, mask_ratio=cfg.mask_ratio, generator=gen)
        parts = lung_weighted_l1(pred, patchify3d(images, cfg.patch_size), mask,
                                 lung_fraction_per_patch(lung, cfg.patch_size), pre.non_lung_weight,
                                 pre.lung_threshold, per_sample=True)
        parts.total.sum().backward()
        norms.append(_grad_norm(mae))
    return norms


def _clf_norms(clf: ILDClassifier, data: Any, mode: str, count: int) -> list[float]:
    set_trainable(clf, mode)
    clf.train()
    weights = class_weights_from_labels(data.labels, NUM_CLASSES)
    norms = []
    for i in range(min(count, len(data))):
        item = data[i]
        clf.zero_grad(set_to_none=True)
        logits = clf(item["image"][None], item["lung_mask"][None])
        torch.nn.functional.cross_entropy(logits, torch.tensor([int(item["label"])]), weight=weights).backward()
        norms.append(_grad_norm(clf))
    return norms


def _summary(norms: list[float]) -> str:
    q = np.quantile(norms, [0.1, 0.5, 0.9])
    return f"{len(norms)} | {q[0]:.3g} | {q[1]:.3g} | {q[2]:.3g} | {max(norms):.3g}"


def measure_norms(args: argparse.Namespace, dataset: Any, parts: dict[str, Any]) -> int:
    """Print per-sample gradient norm quantiles (markdown) for pretraining and each fine-tuning mode."""
    mae = build_mae(model_config("tiny"), seed=0)
    rows = [("MAE pretraining, at initialisation", _mae_norms(mae, parts["pretrain"], args.norm_samples))]
    mae = _pretrain(parts["pretrain"], args.pretrain_epochs, seed=0, cache=args.workdir)
    rows.append((f"MAE pretraining, after {args.pretrain_epochs} epochs",
                 _mae_norms(mae, parts["pretrain"], args.norm_samples)))
    for mode in ("linear-probe", "last-1", "last-2", "full"):
        rows.append((f"fine-tuning {mode}, pretrained encoder, new head",
                     _clf_norms(_classifier(mae, 0), parts["train"], mode, args.norm_samples)))
    print("| loss, trained part | samples | p10 | median | p90 | max |")
    print("|---|---|---|---|---|---|")
    for name, norms in rows:
        print(f"| {name} | {_summary(norms)} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lungmae-dp-utility"))
    parser.add_argument("--scans", type=int, default=120, help="phantoms (patients), one scan each (120)")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds: split and head init (0,1,2)")
    parser.add_argument("--epsilons", default="1,4,8", help="DP budgets of the whole fine-tuning (1,4,8)")
    parser.add_argument("--mode", default=DEFAULT_DP_FINETUNE, help=f"what DP trains ({DEFAULT_DP_FINETUNE})")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="(20)")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (15)")
    parser.add_argument("--batch", type=int, default=16, help="fine-tuning batch (expected Poisson batch) (16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="non-private fine-tuning lr (1e-3, tiny's)")
    parser.add_argument("--dp-lr", type=float, default=1e-2, help="DP fine-tuning lr (1e-2)")
    parser.add_argument("--clip", type=float, default=FINETUNE_CLIP,
                        help=f"DP fine-tuning clipping bound C ({FINETUNE_CLIP:g}, the measured default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating phantoms (1)")
    parser.add_argument("--measure-norms", action="store_true", help="print gradient norm quantiles and stop")
    parser.add_argument("--rows", default="full,subset,dp",
                        help="which fine-tunings: full (no DP, all weights), subset (no DP, --mode), dp "
                             "(full,subset,dp)")
    parser.add_argument("--out", type=Path, default=None, help="per-run results JSON (<workdir>/dp_utility.json)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="only print the table of earlier --out files (e.g. one process per seed)")
    parser.add_argument("--norm-samples", type=int, default=32, help="scans per norm measurement (32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.combine:
        return combine(args.combine)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dataset, _ = phantom_dataset(args.scans, size=model_config("tiny").img_size, seed=0,
                                 cache_dir=args.workdir / "phantoms", workers=args.workers, progress=True)
    if args.measure_norms:
        return measure_norms(args, dataset, split_by_patient(dataset, 0, None))
    seeds = [int(s) for s in args.seeds.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    mae = _pretrain(split_by_patient(dataset, 0, None)["pretrain"], args.pretrain_epochs, seed=0, cache=args.workdir)
    # Row names carry the lr: the non-private subset row trains at the DP lr, so that it and the DP rows differ
    # only by the noise (and the clipping); "no DP, full" is the project's non-private default.
    wanted = {r.strip() for r in args.rows.split(",")}
    runs = [(f"no DP, full, lr {args.lr:g}", "full", None, args.lr, "full"),
            (f"no DP, {args.mode}, lr {args.dp_lr:g}", args.mode, None, args.dp_lr, "subset")]
    runs += [(f"DP eps {e:g}, {args.mode}, lr {args.dp_lr:g}", args.mode, e, args.dp_lr, "dp") for e in epsilons]
    runs = [r[:4] for r in runs if r[4] in wanted]
    rows: dict[str, list[float]] = {name: [] for name, *_ in runs}
    details = []
    for seed in seeds:
        parts = split_by_patient(dataset, seed, None)
        for name, mode, eps, lr in runs:
            out = _finetune(mae, parts, seed=seed, mode=mode, epochs=args.epochs, batch=args.batch, lr=lr,
                            epsilon=eps, clip=args.clip)
            rows[name].append(out["balanced_accuracy"])
            details.append({"seed": seed, "run": name, **out})
            print(f"seed {seed} {name}: balanced accuracy {out['balanced_accuracy']:.3f} "
                  f"(sigma {out['sigma']:.3g}, {out['seconds']:.0f} s)", flush=True)
    n_train = len(split_by_patient(dataset, seeds[0], None)["train"])
    print(f"\n{args.scans} phantoms ({n_train} training patients), tiny model, MAE {args.pretrain_epochs} epochs "
          f"without DP; fine-tuning {args.epochs} epochs, batch {args.batch}, C {args.clip:g}, "
          f"DP lr {args.dp_lr:g}, delta "
          f"{default_delta(n_train):g}; seeds {args.seeds}; {time.perf_counter() - t0:.0f} s in all\n")
    print(_table(rows, next(iter(rows))))
    out = args.out or args.workdir / "dp_utility.json"
    from lungmae_core.atomic import atomic_write_json

    atomic_write_json(out, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": details})
    return 0


def combine(paths: list[Path]) -> int:
    """Print the markdown table of several result files (runs of the same settings, different seeds)."""
    rows: dict[str, list[float]] = {}
    seeds = []
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            rows.setdefault(run["run"], []).append(run["balanced_accuracy"])
            seeds.append(run["seed"])
    print(f"seeds {sorted(set(seeds))}\n")
    print(_table(rows, next(iter(rows))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
