"""Where one MAE training step spends its time: a torch.profiler table of the top operators per config.

Usage::

    python benchmarks/profile_step.py                                # paper-p16 and paper-p8, batch 1
    python benchmarks/profile_step.py --configs tiny --steps 3 --rows 20 --markdown profile.md

One untimed warm-up step, then ``--steps`` profiled steps (forward, lung-weighted L1, backward, AdamW) of
:class:`lungmae_core.model.MAE3D` on a fixed synthetic batch. Prints per config the operators sorted by self
CPU time (CUDA time on a GPU) and the share of matmul/attention in the total, so what is *not* matmul or
attention is visible at once. ``--markdown`` appends the tables to a file (docs/performance.md quotes it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungmae_core.config import model_config  # noqa: E402
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1  # noqa: E402
from lungmae_core.model import MAE3D, patchify3d  # noqa: E402

#: Operators counted as "matmul or attention" (the work the step is for).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")


def profile_config(name: str, batch: int, steps: int, device: torch.device, rows: int) -> str:
    cfg = model_config(name)
    torch.manual_seed(0)
    model = MAE3D(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, cfg.img_size, cfg.img_size, cfg.img_size, generator=g).to(device)
    lung = lung_fraction_per_patch((images > 0.5).float(), cfg.patch_size)
    target = patchify3d(images, cfg.patch_size)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        pred, mask = model(images, generator=gen)
        lung_weighted_l1(pred, target, mask, lung).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    total = sum(getattr(e, key) for e in averages)
    matmul = sum(getattr(e, key) for e in averages if e.key.startswith(MATMUL_OPS))
    table = averages.table(sort_by=key, row_limit=rows, max_name_column_width=40)
    head = (f"{name} batch {batch}, {steps} profiled step(s), {wall:.2f} s/step under the profiler, "
            f"{torch.get_num_threads()} threads, loadavg {Path('/proc/loadavg').read_text().split()[:3]}; "
            f"matmul + attention = {100 * matmul / max(total, 1):.1f}% of self {key.split('_')[1].upper()} time")
    return head + "\n" + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["paper-p16", "paper-p8"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="append the tables to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.configs:
        text = profile_config(name, args.batch, args.steps, torch.device(args.device), args.rows)
        print(text, flush=True)
        if args.markdown:
            with args.markdown.open("a", encoding="utf-8") as fh:
                fh.write(f"```text\n{text}\n```\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
