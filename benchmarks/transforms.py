"""Milliseconds per batch of the flip/rot90 augmentation: MONAI dictionary transforms against plain torch.

Usage::

    python benchmarks/transforms.py                          # batch 2 of 1x128^3, p = 0.1 (training default)
    python benchmarks/transforms.py --size 64 --batch 8 --flip-p 0.5 --rot90-p 0.5 --runs 50

Ours (``lungmae_core.transforms.random_flip_rot90_batch``): MONAI's ``RandFlipd`` per axis and a ``OneOf`` of
``RandRotate90d`` per plane, applied to image and lung mask together. Reference: the plain-torch version it
replaced (``reference_batch`` below, kept verbatim): ``Tensor.flip`` / ``Tensor.rot90`` per sample. Both run
in this process, interleaved (alternating which goes first), on the same batches and seeds, so a noisy machine
slows both alike. Prints one line per variant (median and p90 over the runs) and one JSON record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungmae_core.transforms import random_flip_rot90_batch

_PLANES = ((-3, -2), (-3, -1), (-2, -1))


def reference_one(image, lung_mask, generator, flip_p, rot90_p):
    """The plain-torch augmentation that lungmae_core.transforms used before MONAI's transforms."""
    u = torch.rand(6, generator=generator).tolist()
    flip_dims = [axis for axis, draw in zip((-3, -2, -1), u[:3], strict=True) if draw < flip_p]
    if flip_dims:
        image, lung_mask = image.flip(flip_dims), lung_mask.flip(flip_dims)
    if u[3] < rot90_p:
        plane = _PLANES[min(int(u[4] * 3), 2)]
        k = 1 + min(int(u[5] * 3), 2)
        if image.shape[plane[0]] != image.shape[plane[1]] and k != 2:
            k = 2
        image, lung_mask = image.rot90(k, plane), lung_mask.rot90(k, plane)
    return image, lung_mask


def reference_batch(images, lung_masks, generator, flip_p, rot90_p):
    pairs = [reference_one(i, m, generator, flip_p, rot90_p) for i, m in zip(images, lung_masks, strict=True)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="cube side (default 128, the paper's)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2, site.yaml's default)")
    parser.add_argument("--flip-p", type=float, default=0.1)
    parser.add_argument("--rot90-p", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = torch.rand(args.batch, 1, args.size, args.size, args.size)
    masks = (images > 0.5).to(torch.uint8)
    variants = {"monai (ours)": random_flip_rot90_batch, "plain torch (reference)": reference_batch}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: imports, first allocations
        fn(images, masks, torch.Generator().manual_seed(0), args.flip_p, args.rot90_p)
    for run in range(args.runs):
        order = list(variants.items())
        for name, fn in (order if run % 2 == 0 else order[::-1]):  # alternate who goes first
            gen = torch.Generator().manual_seed(run)
            t0 = time.perf_counter()
            fn(images, masks, gen, args.flip_p, args.rot90_p)
            times[name].append((time.perf_counter() - t0) * 1e3)
    record = {"benchmark": "transforms", "size": args.size, "batch": args.batch, "flip_p": args.flip_p,
              "rot90_p": args.rot90_p, "runs": args.runs, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    for name, ms in times.items():
        ms.sort()
        med, p90 = statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]
        record[name] = {"median_ms": round(med, 3), "p90_ms": round(p90, 3)}
        print(f"{name:26s} median {med:8.3f} ms   p90 {p90:8.3f} ms   per batch of {args.batch} x 1x{args.size}^3")
    ours, ref = record["monai (ours)"]["median_ms"], record["plain torch (reference)"]["median_ms"]
    record["ratio"] = round(ours / ref, 3)
    print(f"MONAI / plain torch: {ours / ref:.2f}x")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
