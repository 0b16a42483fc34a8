"""``lungmae train``: centralized MAE pretraining then ILD fine-tuning, on built-in phantoms or a site cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_NOT_BELOW = "  (not below the baseline: little learned beyond the average anatomy)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lungmae train``."""
    parser.add_argument("--model", default="tiny", metavar="NAME|YAML",
                        help="model config: tiny (CPU, default), paper-p16, paper-p8, paper-256, or a YAML file")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="a site cache prepared by `lungmae site prepare` (default: built-in phantoms)")
    parser.add_argument("--scans", type=int, default=120,
                        help="number of built-in phantoms, balanced over the 4 classes (default: 120)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/train"), metavar="DIR",
                        help="where metrics.json, log.jsonl, checkpoints/ and cached phantoms go "
                             "(default: runs/train)")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="MAE epochs over train+val scans (default: 30)")
    parser.add_argument("--finetune-epochs", type=int, default=15, help="classifier epochs over train (default: 15)")
    parser.add_argument("--no-pretrain", action="store_true",
                        help="skip pretraining: fine-tune from random weights (the from-scratch baseline)")
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help="peak AdamW lr of pretraining (default: 3e-4, the paper's, for paper-* models; 1e-3 for "
                             "tiny, which has far fewer steps; 10%% warmup + cosine)")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="peak AdamW lr of fine-tuning (default: 1e-5, the paper's, for paper-* models; "
                             "1e-3 for tiny, which has far fewer steps)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="pretraining batch (default: 8); fine-tuning uses half of it (paper: 4)")
    parser.add_argument("--finetune-mode", choices=("full", "linear-probe"), default="full",
                        help="train the whole classifier or only its head, norm and CLS token (default: full)")
    parser.add_argument("--pooling", choices=("lung", "mean", "cls"), default="lung",
                        help="classifier pooling over tokens: lung-fraction weighted (default), mean or CLS")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seeds phantoms, splits, weights and masks (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the test metrics next to the reconstruction figures."""
    import torch

    from lungmae_core.centralized.pipeline import run_centralized
    from lungmae_core.config import TrainConfig, model_config

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.model)
    batch = args.batch_size or 8
    finetune_lr = args.finetune_lr or (1e-3 if cfg.name == "tiny" else 1e-5)
    pretrain_lr = args.pretrain_lr or (1e-3 if cfg.name == "tiny" else 3e-4)
    pre = TrainConfig.pretrain_defaults(epochs=args.pretrain_epochs, batch_size=batch, lr=pretrain_lr)
    fine = TrainConfig.finetune_defaults(epochs=args.finetune_epochs, batch_size=max(batch // 2, 1), lr=finetune_lr,
                                         finetune_mode=args.finetune_mode, pooling=args.pooling)
    metrics = run_centralized(workdir=args.workdir, model=cfg, cache=args.cache, scans=args.scans,
                              pretrain=not args.no_pretrain, pretrain_cfg=pre, finetune_cfg=fine, device=args.device,
                              seed=args.seed, workers=args.workers, progress=not args.quiet)
    final, recon = metrics["final"], metrics["reconstruction"]
    out = sys.stdout
    print(f"model {cfg.name}, {'pretrained' if metrics['pretrained'] else 'from scratch'}, "
          f"{metrics['data']['test']} test scans, epoch {metrics['best_epoch']} selected on val", file=out)

    def fmt(key: str) -> str:  # None: undefined (a class missing from the test split), never 0 or 1
        return "undefined" if final.get(key) is None else f"{final[key]:.3f}"

    print(f"test  accuracy {fmt('accuracy')}  balanced accuracy {fmt('balanced_accuracy')}  "
          f"weighted F1 {fmt('weighted_f1')}  ROC AUC {fmt('roc_auc')}", file=out)
    if recon is not None:
        print(f"reconstruction (test, masked lung L1)  MAE {recon['l1_masked_lung']:.4f}  "
              f"mean-anatomy baseline {recon['baseline_l1_masked_lung']:.4f}"
              f"{'' if recon['beats_baseline'] else _NOT_BELOW}",
              file=out)
    print(f"confusion matrix (rows true, columns predicted): {final['confusion_matrix']}", file=out)
    print(f"written: {Path(args.workdir) / 'metrics.json'}", file=out)
    return 0
