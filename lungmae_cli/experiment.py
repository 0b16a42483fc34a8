"""`lungmae experiment`: does federated MAE pretraining help when labels are scarce? Every arm, same data.

Arms (same sites, splits and seeds): federated MAE -> fine-tune / -> linear probe, federated from scratch
(same rounds, and compute-matched at k=8), centralized MAE -> fine-tune, each labelled site alone, a
random-init linear probe, and the global-histogram and zone/texture baselines; k labelled scans per class
per site. Primary endpoint: balanced accuracy of federated MAE -> fine-tune minus federated scratch at k=8.
Writes experiment.json, results.md, accuracy_vs_k.png, reconstruction.png and predictions.npz to --out
after every seed. See docs/results.md for what a run measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae experiment`."""
    parser.add_argument("--profile", choices=("tiny", "quick", "gpu"), default=None,
                        help="sizes and schedules: tiny (a smoke run), quick (<= 60 min on 2 CPU cores), gpu "
                             "(one GPU); default: quick")
    parser.add_argument("--quick", action="store_true", help="the same as --profile quick")
    parser.add_argument("--out", type=Path, default=Path("runs/experiment"), help="output folder (runs/experiment)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the profile's; 3, gpu 5)")
    parser.add_argument("--site", type=Path, nargs="+", default=None, metavar="SITE_YAML",
                        help="run on these prepared sites (their caches; labelled scans are split 70/30 into "
                             "train/test by patient, unlabelled scans pretrain only) instead of the built-in "
                             "experiment phantoms")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="draw of the built-in phantoms (default 0): another value draws other patients for "
                             "every site and the test set, for a confirmation on data no earlier run has seen")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms (2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); use 1 on a shared, oversubscribed machine, where "
                             "two threads made each step ~27x slower (load 16)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where generated phantoms are kept (default: OUT/phantoms)")


def run(args: argparse.Namespace) -> int:
    """Build or load the sites, run every arm, write the outputs, print the endpoint."""
    import dataclasses

    import torch

    from lungmae_core.config import check
    from lungmae_core.errors import ConfigError
    from lungmae_core.experiment.data import build_phantom_sites, load_cache_sites
    from lungmae_core.experiment.report import write_outputs
    from lungmae_core.experiment.runner import PROFILES, run_experiment
    from lungmae_core.train import resolve_device

    name = args.profile or "quick"
    check(not (args.quick and args.profile not in (None, "quick")),
          f"--quick and --profile {args.profile} contradict each other; give one")
    profile = PROFILES[name]
    check(args.seeds is None or args.seeds >= 1, f"--seeds must be at least 1; got {args.seeds}")
    check(args.data_seed is None or args.data_seed >= 0, f"--data-seed must be 0 or more; got {args.data_seed}")
    check(args.data_seed is None or not args.site,
          "--data-seed draws built-in phantoms; it has no meaning with --site (prepared caches)")
    if args.data_seed is not None:
        profile = dataclasses.replace(profile, plan=dataclasses.replace(profile.plan, data_seed=args.data_seed))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out: Path = args.out
    if args.site:
        from client.site_config import load_site_config

        caches = []
        for path in args.site:
            cfg = load_site_config(path)
            if cfg.data.cache is None:
                raise ConfigError(f"{path}: data: 'cache' is not set; the experiment reads the site's prepared "
                                  "cache (`lungmae site prepare --config SITE_YAML` writes it)")
            caches.append((cfg.site.name, cfg.data.cache))
        data = load_cache_sites(caches, size=profile.model.img_size, seed=0)
        k_max = min(int((s.labels == c).sum()) for s in data.labelled_sites for c in range(len(data.class_names)))
        ks = tuple(k for k in profile.ks if k <= max(k_max, 1)) or (max(k_max, 1),)
        profile = dataclasses.replace(profile, ks=ks)
    else:
        data = build_phantom_sites(profile.plan, args.cache_dir or out / "phantoms", workers=args.workers,
                                   progress=True)
    print(f"experiment ({profile.name}): {len(data.sites)} sites, {len(data.test_labels)} test patients, "
          f"k in {list(profile.ks)}, device {device}; outputs in {out}", flush=True)
    written: list[dict[str, Any]] = []  # run_experiment hands its final results to on_seed_done last
    results = run_experiment(profile, data, out, device=device, seeds=args.seeds,
                             on_seed_done=lambda r: written.append(write_outputs(r, data, out)))
    payload = written[-1] if written else write_outputs(results, data, out)
    ep = payload["endpoint"]
    if "difference" in ep:
        print(f"endpoint (fed MAE -> fine-tune minus fed scratch, balanced accuracy, k={ep['k']}): "
              f"{ep['difference']:+.3f} [95% CI {ep['ci'][0]:+.3f}, {ep['ci'][1]:+.3f}]")
    print(f"wrote {out / 'experiment.json'}, {out / 'results.md'} ({results['seconds']:.0f} s)")
    return 0
