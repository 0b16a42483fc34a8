"""Seconds and peak memory to preprocess one 512x512x300 chest CT series: ours against the authors' approach.

Usage::

    python benchmarks/prepare.py                        # phantom 300x512x512, size 128, ours x3 vs reference x1
    python benchmarks/prepare.py --shape 150 256 256 --ours-runs 5 --reference-runs 2 --json prepare.json
    python benchmarks/prepare.py --nifti scan.nii.gz    # any real volume instead of the phantom

Ours (``lungmae_core.preprocess.preprocess_volume``): lung mask on a ~3 mm grid of block means, crop box in mm,
one separable trilinear pass of the cropped region straight to the cube (after a box prefilter where an output
voxel spans two or more input voxels; ``--no-antialias`` turns it off). Reference
(``reference_preprocess``, the authors' order): cubic ``scipy.ndimage.zoom`` of the whole volume to isotropic
voxels, the same classical lung mask at that full resolution, crop with 32 isotropic voxels of margin,
trilinear zoom to the cube. Both run in this process, interleaved (ours, reference, ours, ...), so a noisy
machine slows both alike. Peak memory is what NumPy/SciPy allocate during the call beyond the input volume
(``tracemalloc``, which NumPy reports its buffers to). Output agreement: Dice of the two lung masks and the
mean absolute difference of the two [0, 1] images.

Prints one line per run, a side-by-side summary and one JSON record (``--json`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungmae_core.config import PreprocessConfig  # noqa: E402
from lungmae_core.preprocess import Sample, preprocess_volume, reference_preprocess  # noqa: E402
from lungmae_core.synthetic.phantoms import generate_phantom  # noqa: E402
from lungmae_core.synthetic.scanners import scanner_for_site  # noqa: E402
from lungmae_core.volume import Volume  # noqa: E402

# -- config block (nanoGPT bench.py style) ------------------------------------------------------------------
SHAPE = (300, 512, 512)   # (slices, rows, columns) of the phantom series
LABEL = "fibrosis"        # phantom class
SEED = 0
SITE = 0                  # scanner profile: site 0 covers 300 x 368 x 368 mm -> 1.0 x 0.72 x 0.72 mm voxels
SIZE = 128                # output cube side
OURS_RUNS = 3
REFERENCE_RUNS = 1


def measure(fn: Callable[[], Sample]) -> tuple[Sample, float, int]:
    """Run ``fn`` once: (result, seconds, peak bytes allocated during the call)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("D", "H", "W"))
    parser.add_argument("--label", default=LABEL)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--site", type=int, default=SITE)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--ours-runs", type=int, default=OURS_RUNS)
    parser.add_argument("--reference-runs", type=int, default=REFERENCE_RUNS)
    parser.add_argument("--no-antialias", action="store_true",
                        help="ours without the box prefilter (interpolate raw voxels, as the reference does)")
    parser.add_argument("--nifti", type=Path, help="preprocess this NIfTI volume instead of a phantom")
    parser.add_argument("--json", type=Path, help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    if args.ours_runs < 1 or args.reference_runs < 1:
        parser.error("--ours-runs and --reference-runs must be >= 1 (the comparison needs both)")

    t0 = time.perf_counter()
    if args.nifti:
        from lungmae_core.nifti import load_nifti

        volume = load_nifti(args.nifti)
        source = f"nifti {args.nifti.name}"
    else:
        phantom = generate_phantom(args.label, seed=args.seed, scanner=scanner_for_site(args.site), shape=args.shape)
        volume = Volume.from_spacing(phantom.hu, phantom.spacing_mm)
        source = f"phantom {args.label} seed {args.seed} site {args.site}"
    load_s = time.perf_counter() - t0
    spacing = ", ".join(f"{s:.3f}" for s in volume.spacing_mm)
    print(f"input: {source}, shape {volume.shape}, spacing ({spacing}) mm, {volume.hu.nbytes / 2**20:.0f} MiB "
          f"float32 (made in {load_s:.1f} s); cube {args.size}^3; {os.cpu_count()} CPUs, {platform.processor()}")
    cfg = PreprocessConfig(size=args.size, antialias=not args.no_antialias)

    runs: dict[str, list[tuple[float, int, dict[str, float]]]] = {"ours": [], "reference": []}
    samples: dict[str, Sample] = {}
    order = ["ours"] + ["reference", "ours"] * max(args.reference_runs, args.ours_runs - 1)
    counts = {"ours": 0, "reference": 0}
    limits = {"ours": args.ours_runs, "reference": args.reference_runs}
    for name in order:
        if counts[name] >= limits[name]:
            continue
        counts[name] += 1
        fn = preprocess_volume if name == "ours" else reference_preprocess
        stages: dict[str, float] = {}
        sample, seconds, peak = measure(lambda: fn(volume, cfg, timings=stages))  # noqa: B023
        samples[name] = sample
        runs[name].append((seconds, peak, stages))
        detail = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        print(f"  {name:9s} run {counts[name]}: {seconds:7.2f} s  peak {peak / 2**20:7.0f} MiB  ({detail})")

    ours_s = statistics.median(r[0] for r in runs["ours"])
    ref_s = statistics.median(r[0] for r in runs["reference"])
    ours_mib = max(r[1] for r in runs["ours"]) / 2**20
    ref_mib = max(r[1] for r in runs["reference"]) / 2**20
    a, b = samples["ours"], samples["reference"]
    mask_dice = dice(a.lung_mask, b.lung_mask)
    image_mad = float(np.abs(a.image - b.image).mean())
    print()
    print(f"{'':28s}{'ours':>12s}{'reference':>12s}")
    print(f"{'seconds per series (median)':28s}{ours_s:12.2f}{ref_s:12.2f}   speed-up {ref_s / ours_s:.1f}x")
    ratio = ref_mib / max(ours_mib, 1e-9)
    print(f"{'peak extra memory (MiB)':28s}{ours_mib:12.0f}{ref_mib:12.0f}   ratio {ratio:.1f}x")
    print(f"{'lung volume (mL)':28s}{a.qc['lung_volume_ml']:12.0f}{b.qc['lung_volume_ml']:12.0f}")
    print(f"{'lung HU mean':28s}{a.qc['hu_mean']:12.1f}{b.qc['hu_mean']:12.1f}")
    print(f"output agreement: lung-mask Dice {mask_dice:.4f}, image mean |diff| {image_mad:.4f} "
          f"(= {image_mad * 1200:.1f} HU), max |diff| {float(np.abs(a.image - b.image).max()):.3f}")
    record = {
        "benchmark": "prepare", "source": source, "shape": list(volume.shape), "spacing_mm": list(volume.spacing_mm),
        "size": args.size, "cpus": os.cpu_count(), "antialias": cfg.antialias,
        "ours": {"seconds": [r[0] for r in runs["ours"]], "median_s": ours_s, "peak_mib": ours_mib,
                 "stages": runs["ours"][-1][2]},
        "reference": {"seconds": [r[0] for r in runs["reference"]], "median_s": ref_s, "peak_mib": ref_mib,
                      "stages": runs["reference"][-1][2]},
        "speedup": ref_s / ours_s, "mask_dice": mask_dice, "image_mean_abs_diff": image_mad,
    }
    print(json.dumps(record))
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
