"""`lungmae simulate`: the main job. Synthetic hospitals -> site prepare -> federated pretrain + fine-tune.

Runs, on one machine and with no arguments needed:

1. ``lungmae synth``: synthetic hospitals as DICOM trees with labels (``WORKDIR/sites/site<i>``);
2. ``lungmae site prepare`` for each site (its cache of preprocessed cubes);
3. the project's ServerApp and ClientApp under Flower's simulation runtime (one virtual SuperNode per site,
   1 CPU each): federated MAE pretraining, hand-off, federated fine-tuning, final evaluation at every site;
4. ``lungmae report``: ``WORKDIR/run/report.html``.

With ``--site a/site.yaml --site b/site.yaml ...`` steps 1-2 are skipped: the federation runs over those
sites' already prepared caches (real or synthetic data), one virtual SuperNode per site.yaml with its own
settings, privacy ledger and labels. Every cache is checked first (:mod:`lungmae_cli.site_caches`), so a
missing, stale or unlabelled cache is one error naming the site and the fix, before Ray starts.

Sites are reused on a second run with the same ``--sites/--scans-per-site/--seed``; the federation run
directory ``WORKDIR/run`` starts afresh unless ``--resume`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Tuned so that the default run ends within 5 minutes on 2 CPU cores and the classifier clearly beats chance.
DEFAULTS: dict[str, Any] = dict(sites=3, model="tiny", scans_per_site=60, pretrain_rounds=4, finetune_rounds=10,
                                pretrain_epochs=5, finetune_epochs=5, seed=0, slices=48, matrix=96)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lungmae simulate`."""
    d = DEFAULTS
    parser.add_argument("--site", type=Path, action="append", default=None, metavar="SITE_YAML",
                        help="run over this site's prepared cache instead of synthetic hospitals; once per site "
                             "(`lungmae site prepare --config SITE_YAML` first)")
    parser.add_argument("--sites", type=int, default=d["sites"], help=f"synthetic hospitals ({d['sites']})")
    parser.add_argument("--model", default=d["model"], help=f"model config name or YAML ({d['model']})")
    parser.add_argument("--scans-per-site", type=int, default=d["scans_per_site"],
                        help=f"patients per hospital ({d['scans_per_site']}); split 60/20/20 train/val/test")
    parser.add_argument("--labelled-fraction", type=_fractions, default=(1.0,), metavar="F[,F...]",
                        help="fraction of each hospital's patients with a label: one value or one per site (1.0)")
    parser.add_argument("--unlabelled-sites", type=int, default=0,
                        help="extra hospitals without any label: they join MAE pretraining only (0)")
    parser.add_argument("--slices", type=int, default=d["slices"],
                        help=f"slices per synthetic series ({d['slices']}; the tiny model sees 64^3 cubes)")
    parser.add_argument("--matrix", type=int, default=d["matrix"], help=f"rows = columns per slice ({d['matrix']})")
    parser.add_argument("--pretrain-rounds", type=int, default=d["pretrain_rounds"],
                        help=f"federated MAE rounds ({d['pretrain_rounds']})")
    parser.add_argument("--finetune-rounds", type=int, default=d["finetune_rounds"],
                        help=f"federated fine-tuning rounds ({d['finetune_rounds']})")
    parser.add_argument("--pretrain-epochs", type=int, default=d["pretrain_epochs"],
                        help=f"local epochs per pretrain round ({d['pretrain_epochs']})")
    parser.add_argument("--finetune-epochs", type=int, default=d["finetune_epochs"],
                        help=f"local epochs per fine-tuning round ({d['finetune_epochs']})")
    parser.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedprox", "trimmed-mean", "median"),
                        help="aggregation (fedavg); fedprox uses --mu")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight (0.01)")
    parser.add_argument("--compression", default="fp16", choices=("fp16", "fp32", "int8", "topk"),
                        help="encoding of site updates (fp16)")
    parser.add_argument("--finetune-mode", default="full", choices=("full", "linear-probe"), help="(full)")
    parser.add_argument("--federation-config", type=Path, default=None,
                        help="a federation.yaml to use instead of the options above (its run-dir is replaced)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/simulate"), help="output folder (runs/simulate)")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"seed of data, models and sampling ({d['seed']})")
    parser.add_argument("--resume", action="store_true", help="continue WORKDIR/run instead of starting over")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def site_count(args: argparse.Namespace) -> int:
    """How many sites this simulation runs: one per ``--site``, else ``--sites`` synthetic hospitals."""
    return len(args.site) if args.site else args.sites


def _fractions(text: str) -> tuple[float, ...]:
    from lungmae_cli.synth import parse_fractions

    return parse_fractions(text)


def ray_slots(sites: int, cores: int) -> int:
    """Ray's CPU count for the simulation: one single-threaded ClientApp per site, up to twice the cores.

    Why: with one slot per core, 3 sites on 2 cores train two at a time and then the third alone on one core
    while the other idles (every round: two site-trainings long); with a slot per site the three share both
    cores (one and a half). Each ClientApp uses one torch thread (``LUNGMAE_CLIENT_THREADS``), so the result
    is the same; more than twice the cores would only add memory (a model and its data per ClientApp).
    """
    cores = max(1, cores)
    return max(cores, min(max(1, sites), 2 * cores))


def federation_for(args: argparse.Namespace, run_dir: Path) -> Any:
    """The FederationConfig of this simulation (from the options, or the given YAML with our run-dir)."""
    import dataclasses

    from server.federation_config import federation_from_mapping, load_federation_config

    if args.federation_config is not None:
        cfg = load_federation_config(args.federation_config)
        return dataclasses.replace(cfg, run_dir=run_dir, resume=bool(args.resume))
    # One failing hospital must not stop the federation; hospitals without labels pretrain only.
    min_sites = max(1, site_count(args) - 1)
    min_pretrain_sites = max(1, site_count(args) + getattr(args, "unlabelled_sites", 0) - 1)
    return federation_from_mapping({
        "model": {"name": args.model},
        "phases": {
            "pretrain": {"rounds": args.pretrain_rounds, "local-epochs": args.pretrain_epochs, "lr": 1e-3,
                         "min-sites": min_pretrain_sites, "evaluate-every": max(1, args.pretrain_rounds)},
            "finetune": {"rounds": args.finetune_rounds, "local-epochs": args.finetune_epochs, "lr": 1e-3,
                         "min-sites": min_sites, "evaluate-every": 1, "mode": args.finetune_mode}},
        "strategy": {"name": args.strategy, "mu": args.mu if args.strategy == "fedprox" else 0.0},
        "compression": args.compression, "run-dir": str(run_dir), "resume": bool(args.resume),
        "seed": args.seed, "round-timeout-s": 600, "server": {"audit-log": True}}, source="lungmae simulate")


def prepare_sites(args: argparse.Namespace, sites_dir: Path, img_size: int) -> list[Path]:
    """Write (or reuse) the synthetic hospitals and prepare each one's cache; return the site.yaml paths."""
    import json

    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from lungmae_cli.synth import write_synthetic_sites
    from lungmae_core.atomic import atomic_write_json
    from lungmae_core.manifest import read_manifest

    shape = (args.slices, args.matrix, args.matrix)
    fractions = list(getattr(args, "labelled_fraction", (1.0,)))
    unlabelled = int(getattr(args, "unlabelled_sites", 0))
    stamp = {"sites": args.sites, "scans_per_site": args.scans_per_site, "seed": args.seed, "size": img_size,
             "shape": list(shape), "labelled_fraction": fractions, "unlabelled_sites": unlabelled}
    stamp_path = sites_dir / "simulate.json"
    paths = [sites_dir / f"site{i}" / "site.yaml" for i in range(args.sites + unlabelled)]
    reuse = stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and all(p.exists() for p in paths)
    if not reuse:
        print(f"[1/3] writing {args.sites} synthetic hospitals x {args.scans_per_site} CT studies to {sites_dir}")
        paths = write_synthetic_sites(sites_dir, sites=args.sites, scans_per_site=args.scans_per_site,
                                      seed=args.seed, shape=shape, preprocess_size=img_size, workers=2,
                                      labelled_fraction=fractions, unlabelled_sites=unlabelled,
                                      progress=True)
    else:
        print(f"[1/3] reusing the synthetic hospitals in {sites_dir}")
    for path in paths:
        site = load_site_config(path)
        cache = site.data.cache
        if reuse and cache is not None and (cache / "manifest.csv").exists() and read_manifest(cache):
            continue
        report = prepare_site(site, workers=2, progress=True)
        print(f"[2/3] {site.site.name}: {report.accepted} series accepted, {report.rejected} rejected")
    atomic_write_json(stamp_path, stamp)
    return [Path(p) for p in paths]


def _step_line(step: Any, total_steps: int, record: dict[str, Any]) -> str:
    """One line per finished step: loss, validation, participation, bytes and time."""
    head = f"  step {step.index + 1}/{total_steps}"
    if step.kind == "handoff":
        return f"{head}  hand-off: MAE encoder -> classifier"
    if step.kind == "final":
        return f"{head}  final evaluation at every site"
    if step.kind == "cross-site":
        return f"{head}  cross-site evaluation: local models fine-tuned, every model scored at every site"
    train, ev = record["train"]["aggregated"], record["evaluate"]["aggregated"]
    part = record["participation"]
    loss = train.get("loss")  # None: withheld by the sites (DP) or no valid update
    text = f"{head}  {step.name:<14} loss " + (f"{loss:.4f}" if loss is not None else "n/a")
    if ev.get("accuracy") is not None:
        text += f"  val acc {ev['accuracy']:.3f}"
    elif ev.get("l1_masked") is not None and ev.get("baseline_l1_masked") is not None:
        text += f"  val L1 {ev['l1_masked']:.4f} (baseline {ev['baseline_l1_masked']:.4f})"
    text += (f"  sites {len(part['replied'])}/{len(part['sampled'])}"
             f"  {record['bytes']['up'] / 1e6:.1f} MB up  {record['duration_s']:.1f} s")
    if record["skipped"]:
        text += f"  SKIPPED: {record['note']}"
    return text


def _progress_bar(total_steps: int) -> tuple[Any, Any]:
    """A tqdm bar over the plan's steps (rounds, hand-off, final), advanced after each; and its callback.

    Each finished step also prints its line above the bar, so the log keeps every round's figures.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="federation", unit="step", dynamic_ncols=True)

    def show(step: Any, record: dict[str, Any]) -> None:
        tqdm.write(_step_line(step, total_steps, record))
        bar.set_postfix_str(step.name if step.kind == "train" else step.kind, refresh=False)
        bar.update(1)
    return show, bar


def run(args: argparse.Namespace) -> int:
    """Run the whole simulation and print where the results are."""
    import json
    import logging
    import os
    import time

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from lungmae_cli.site_caches import check_site_caches
    from lungmae_core.config import check, model_config
    from server.schedule import phase_plan

    if not args.site:
        check(args.sites >= 1, f"--sites must be at least 1; got {args.sites}")
        check(args.scans_per_site >= 5, f"--scans-per-site must be at least 5 (train/val/test per site); "
                                        f"got {args.scans_per_site}")
    for name in ("alembic", "client.prepare", "client.pseudonym", "lungmae_core.synthetic.dicom_writer"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-series lines: see each cache's manifest.csv
    t0 = time.perf_counter()
    workdir = args.workdir.resolve()
    run_dir = workdir / "run"
    cfg = federation_for(args, run_dir)
    if args.site:
        site_paths = [Path(p).resolve() for p in args.site]
        print(f"[1/3] using the prepared caches of {len(site_paths)} sites (no synthetic hospitals)")
    else:
        img_size = model_config(cfg.model.name, **cfg.model.overrides).img_size
        site_paths = prepare_sites(args, workdir / "sites", img_size)
    # Both ways reach here with site.yaml files; each cache is checked before Ray starts (minutes of start-up
    # and a vague "site cannot serve" from inside a worker otherwise).
    caches = check_site_caches(site_paths, need_labels=cfg.phases.finetune.rounds > 0)
    for item in caches:
        print(f"[2/3] {item.name}: {item.accepted} scans ({item.labelled_train} labelled for training, "
              f"{item.labelled_test} for testing)")
    t_data = time.perf_counter() - t0

    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app

    plan = phase_plan(cfg.phases, cross_site=cfg.cross_site.enabled)
    print(f"[3/3] federated run: {len(site_paths)} sites, {cfg.phases.pretrain.rounds} pretrain + "
          f"{cfg.phases.finetune.rounds} finetune rounds, {cfg.strategy.name}, {cfg.compression} updates "
          f"(the first round also starts Ray and the sites' apps: ~10 s more)", flush=True)
    for name in ("flwr", "ray", "server"):  # one line per round below; warnings (dropped replies) still show
        logging.getLogger(name).setLevel(logging.WARNING)
    progress, bar = _progress_bar(len(plan))
    try:
        run_simulation(
            server_app=make_server_app(cfg, progress=progress),
            client_app=make_client_app(site_paths),
            num_supernodes=len(site_paths),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": ray_slots(len(site_paths), os.cpu_count() or 1),
                                          "include_dashboard": False, "logging_level": "error",
                                          "log_to_driver": True}},
            verbose_logging=False,
        )
    finally:
        bar.close()
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        print(f"lungmae simulate: the federated run wrote no {metrics_path}; see the log above")
        return 1
    summary = json.loads(metrics_path.read_text())
    report_path = None
    if not args.no_report:
        try:
            from server.report import render_report
        except ImportError:  # the report area is optional for the run itself
            render_report = None
        if render_report is not None:
            report_path = render_report(run_dir)
    pooled = (summary.get("final") or {}).get("pooled") or {}
    print(f"done in {time.perf_counter() - t0:.0f} s (data {t_data:.0f} s); status {summary.get('status')}")
    if pooled:
        def fmt(key: str) -> str:  # None: undefined (a class missing from the test scans), never 0 or 1
            value = pooled.get(key)
            return "undefined" if value is None else f"{value:.3f}"

        print(f"final global classifier, pooled over {int(pooled.get('num_examples', 0))} test scans: "
              f"accuracy {fmt('accuracy')}, balanced accuracy {fmt('balanced_accuracy')}, "
              f"weighted F1 {fmt('weighted_f1')}, ROC AUC {fmt('roc_auc')} "
              f"(chance: {1 / len(cfg.classes):.2f}; {int(pooled.get('classes_present', 0))} of "
              f"{len(cfg.classes)} classes in the test scans)")
    print(f"metrics: {metrics_path}")
    if report_path is not None:
        print(f"report:  {report_path}")
    return 0 if summary.get("status") == "completed" else 1
