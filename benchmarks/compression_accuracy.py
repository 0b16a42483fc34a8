"""Accuracy cost and bytes of each update compression: the same federated fine-tuning, same seeds and sites.

Usage::

    python benchmarks/compression_accuracy.py                          # fp32 fp16 int8 topk, 3 seeds
    python benchmarks/compression_accuracy.py --codecs fp32 int8 --seeds 1 --json compression.json

For each compression and seed, the experiment harness's in-process FedAvg
(:func:`lungmae_core.experiment.federation.federated_classifier`) fine-tunes the same classifier from the
same initial weights on the same labelled phantom sites and test set, with the wire put back by
:class:`lungmae_core.update_codec.UpdateCodec`: each site loads the global model as the server sends it
(fp16; fp32 for ``fp32``) and its update ``local - received`` is encoded with the compression and decoded
(``int8``: per-block int8, ``topk``: the 10% largest values; both with error feedback at the site, the code
the ClientApp runs). Everything else (data, initial weights, local training seeds, the order of sites) is the
same across compressions, so the differences are the compression's alone.

Printed per compression: the bytes a site sends per round as a share of fp32 (exact payload bytes), the
balanced accuracy on the pooled test patients (mean over seeds, 95% bootstrap interval over patients,
:func:`lungmae_core.experiment.stats.summarise`), and the paired difference to fp32 with its 95% interval
(:func:`~lungmae_core.experiment.stats.paired_difference`). The target: <= 25% of the fp32 bytes at <= 1
point (0.01) of balanced accuracy lost.

The profile (``PROFILE`` below) is built here, small enough for <= 15 minutes on 2 shared CPU cores, and
tuned so that fp32 fine-tuning learns (well above the chance level of 0.25): a comparison of
compressions at chance would show nothing. Phantoms are cached (``--cache``), so reruns skip drawing them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODECS = ("fp32", "fp16", "int8", "topk")
#: the benchmark's own small profile (see the module docstring)
#: (the linear patch stem: in a 150-step probe at lr 1e-3 it left chance, the conv stem did not at 1e-3 or 3e-3)
PROFILE = {"labelled_sites": 3, "k_max": 12, "test_per_class": 10, "heldout_per_class": 4, "size": 32,
           "shape_scale": 0.35, "k": 12, "rounds": 15, "local_steps": 5, "batch_size": 8, "lr": 2e-3,
           "embed_dim": 64, "depth": 2, "heads": 2, "patch": 8, "stem": "linear"}


def _model_config():
    from lungmae_core.config import TINY_INPUT_WINDOWS, ModelConfig

    p = PROFILE
    return ModelConfig(name="bench-compression", img_size=p["size"], patch_size=p["patch"], embed_dim=p["embed_dim"],
                       depth=p["depth"], num_heads=p["heads"], mlp_dim=4 * p["embed_dim"],
                       decoder_embed_dim=p["embed_dim"], decoder_depth=1, decoder_num_heads=2,
                       decoder_mlp_dim=4 * p["embed_dim"], mask_ratio=0.6, input_windows=TINY_INPUT_WINDOWS,
                       stem=p["stem"])


def run(codec_name: str, seed: int, data, device) -> tuple:
    """One federated fine-tuning with ``codec_name``; returns (test probabilities, sent fraction, bytes/round)."""
    import numpy as np
    import torch

    from lungmae_core.config import TrainConfig
    from lungmae_core.experiment.data import labelled_subset
    from lungmae_core.experiment.federation import ArrayDataset, federated_classifier, predict
    from lungmae_core.heads import ILDClassifier
    from lungmae_core.update_codec import UpdateCodec

    p = PROFILE
    n_cls = len(data.class_names)
    sites = [ArrayDataset(s.images, s.masks, s.labels, labelled_subset(s, p["k"], seed, n_cls))
             for s in data.labelled_sites]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 7919 + 1)
        clf = ILDClassifier(_model_config(), n_cls, pooling="lung")
    tcfg = TrainConfig(lr=p["lr"], weight_decay=0.05, warmup_frac=0.1, max_steps=p["local_steps"],
                       batch_size=p["batch_size"], flip_p=0.0, rot90_p=0.0, finetune_mode="full", layer_decay=1.0)
    with UpdateCodec(codec_name, tag="finetune") as codec:
        federated_classifier(clf, sites, tcfg, rounds=p["rounds"], seed=seed, device=device, num_classes=n_cls,
                             codec=codec)
        fraction = codec.sent_fraction()
        per_round = sum(codec.bytes_sent) / p["rounds"]
    probs = predict(clf, data.test_images, data.test_masks, device=device)
    return probs, fraction, per_round, float(np.mean(probs.argmax(1) == data.test_labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench" / "compression-phantoms")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import numpy as np
    import torch

    from lungmae_core.experiment.data import PhantomPlan, build_phantom_sites
    from lungmae_core.experiment.stats import paired_difference, summarise

    torch.set_num_threads(args.threads)
    p = PROFILE
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    plan = PhantomPlan(labelled_sites=p["labelled_sites"], unlabelled_sites=0, k_max=p["k_max"],
                       test_per_class=p["test_per_class"], heldout_per_class=p["heldout_per_class"],
                       unlabelled_per_site=0, size=p["size"], shape_scale=p["shape_scale"])
    data = build_phantom_sites(plan, args.cache, workers=2)
    n_cls = len(data.class_names)
    print(f"{len(data.test_labels)} test patients, {n_cls} classes (chance 1/{n_cls}); {p['labelled_sites']} sites x "
          f"{p['k']} per class; {p['rounds']} rounds x {p['local_steps']} local steps; "
          f"data {time.perf_counter() - t0:.0f} s; "
          f"loadavg {[round(v, 2) for v in load0]}", flush=True)
    device = torch.device("cpu")
    probs: dict[str, list] = {}
    rows = []
    for name in args.codecs:
        start = time.perf_counter()
        fractions, per_round, train_acc = [], [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            pr, frac, pround, acc = run(name, seed, data, device)
            probs.setdefault(name, []).append(pr)
            fractions.append(frac)
            per_round.append(pround)
            train_acc.append(acc)
        s = summarise(data.test_labels, probs[name], n_cls, n_boot=args.n_boot)
        row = {"codec": name, "sent_fraction_of_fp32": sum(fractions) / len(fractions),
               "bytes_per_round": sum(per_round) / len(per_round), "balanced_accuracy": s["balanced_accuracy"],
               "balanced_accuracy_ci": s["balanced_accuracy_ci"], "per_seed": s["balanced_accuracy_per_seed"],
               "seconds": time.perf_counter() - start}
        if name != "fp32" and "fp32" in probs:
            d = paired_difference(data.test_labels, probs[name], probs["fp32"], n_cls, n_boot=args.n_boot)
            row["difference_to_fp32"], row["difference_ci"] = d["difference"], d["ci"]
            # how far the compressed run's model is from fp32's, beyond the balanced accuracy
            row["mean_abs_prob_diff"] = float(np.mean([np.abs(a - b).mean() for a, b in
                                                       zip(probs[name], probs["fp32"], strict=True)]))
            row["changed_predictions"] = int(sum(int((a.argmax(1) != b.argmax(1)).sum()) for a, b in
                                                 zip(probs[name], probs["fp32"], strict=True)))
        rows.append(row)
        diff = (f"; vs fp32 {row['difference_to_fp32']:+.3f} [{row['difference_ci'][0]:+.3f}, "
                f"{row['difference_ci'][1]:+.3f}], {row['changed_predictions']} predictions changed, mean |p - "
                f"p_fp32| {row['mean_abs_prob_diff']:.2e}" if "difference_to_fp32" in row else "")
        print(f"{name:>5}: {100 * row['sent_fraction_of_fp32']:5.1f}% of fp32 bytes "
              f"({row['bytes_per_round'] / 2 ** 20:.2f} MiB per round, all sites); balanced accuracy "
              f"{row['balanced_accuracy']:.3f} [{row['balanced_accuracy_ci'][0]:.3f}, "
              f"{row['balanced_accuracy_ci'][1]:.3f}] (per seed {[round(v, 3) for v in row['per_seed']]}){diff}; "
              f"{row['seconds']:.0f} s", flush=True)
    record = {"profile": PROFILE, "seeds": list(range(args.first_seed, args.first_seed + args.seeds)), "rows": rows,
              "load_start": list(load0),
              "load_end": list(os.getloadavg()), "seconds": time.perf_counter() - t0}
    print(f"loadavg {[round(v, 2) for v in load0]} -> {[round(v, 2) for v in os.getloadavg()]}; "
          f"{record['seconds']:.0f} s in all")
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
