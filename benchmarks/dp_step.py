"""Time and peak memory of one DP-SGD MAE step per Opacus per-sample gradient mode, against the plain step.

Usage::

    python benchmarks/dp_step.py                              # tiny and paper-p16 at batch 2
    python benchmarks/dp_step.py --configs tiny --timed 5 --json dp_step.json
    python benchmarks/dp_step.py --interleave --timed 8   # all modes alive, steps alternate (busy machines)
    python benchmarks/dp_step.py --configs paper-p16 --modes hooks bookkeeping --flops --batch 8   # FLOP floor

One process, one config at a time. For each mode a fresh copy of the same seeded MAE takes the same steps
(forward with the same masks, per-sample lung-weighted L1, backward, AdamW) on the same synthetic batch:

* ``plain``: no DP, the reference, measured before and after each DP mode (a busy machine drifts; each
  mode's ratio is to the mean of the two plain measurements around it);
* ``hooks``: Opacus ``GradSampleModule`` with closed-form per-layer grad samplers (our token modules have
  their own, ``lungmae_core.privacy.register_grad_samplers``), then clip + noise;
* ``functorch``: the same, with every layer's per-sample gradient from ``torch.func`` (vmap of grad);
* ``ghost``: Opacus ghost clipping: per-sample gradient *norms* only, then a second backward pass of the
  clipped loss (needs the per-sample loss vector, which our training loop keeps under DP);
* ``bookkeeping``: ``lungmae_core.dp_clipping`` (the site's ``grad-sample-mode: bookkeeping``): one
  ordinary backward pass, per-layer ghost norm or per-sample gradient by cost, the clipped sum as one matmul
  per layer, then Opacus' noise.

With ``--interleave`` each mode's CPU time per step (``time.process_time``) is printed too: on a machine
shared with other work the wall-time ratio is mostly the others' load, the CPU-time ratio is this step's.

Peak memory: on GPU the CUDA allocator's peak during the step; on CPU the peak resident set during the step
above the resident set before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``). Prints one line
per config and mode (ms/step, ratio to plain, peak MiB) and writes a JSON record with ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungmae_core.config import model_config  # noqa: E402
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1  # noqa: E402
from lungmae_core.model import build_mae, patchify3d  # noqa: E402
from lungmae_core.privacy import register_grad_samplers  # noqa: E402

# -- config block ---------------------------------------------------------------------------------------------
CONFIGS = {"tiny": 2, "paper-p16": 2}  # config -> batch size
DP_MODES = ("hooks", "functorch", "ghost", "bookkeeping")
#: book-keeping with every layer forced to one per-sample-norm method (to check the per-layer choice)
BK_FORCED = {"bk-ghost": "ghost", "bk-instantiate": "instantiate"}
BURN_IN = 1
TIMED = 2
SEED = 0
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 0.005

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Secure RNG turned off")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or Linux peak RSS above the RSS before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.linux = Path("/proc/self/clear_refs").exists()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        elif self.linux:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed blocks back so RSS starts honest
            except OSError:
                pass
            self.base = _rss_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.linux:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base
        else:
            self.peak = float("nan")


def make_step(mode: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int):
    """Build the optimizer (private or not) for ``mode`` and return ``step()`` running one training step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = model.cfg
    images, lung = batch["image"], batch["lung_mask"]
    target = patchify3d(images, cfg.patch_size)
    lung_frac = lung_fraction_per_patch(lung, cfg.patch_size)
    mask_gen = torch.Generator(device=images.device)
    forward_model: torch.nn.Module = model
    ghost = mode == "ghost"
    if mode == "bookkeeping" or mode in BK_FORCED:  # what OpacusPrivacy(grad_sample_mode="bookkeeping") builds
        from lungmae_core.dp_clipping import BookkeepingClipper, bookkeeping_optimizer

        clipper = BookkeepingClipper(model, MAX_GRAD_NORM, mode=BK_FORCED.get(mode, "mixed"))  # type: ignore[arg-type]
        optimizer = bookkeeping_optimizer(optimizer, clipper,
                                          noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=images.shape[0])
    elif mode != "plain":
        from opacus import GradSampleModule
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleModuleFastGradientClipping,
        )
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        register_grad_samplers()
        if ghost:
            forward_model = GradSampleModuleFastGradientClipping(model, max_grad_norm=MAX_GRAD_NORM,
                                                                 use_ghost_clipping=True)
            optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=NOISE_MULTIPLIER,
                                                        max_grad_norm=MAX_GRAD_NORM,
                                                        expected_batch_size=images.shape[0])
        else:
            forward_model = GradSampleModule(model, force_functorch=mode == "functorch")
            optimizer = DPOptimizer(optimizer, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                    expected_batch_size=images.shape[0])

    def step() -> float:
        mask_gen.manual_seed(seed)
        pred, mask = forward_model(images, generator=mask_gen)
        per_sample = lung_weighted_l1(pred, target, mask, lung_frac, per_sample=True).total  # (B,)
        if ghost:
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(forward_model, optimizer, per_sample, "mean").backward()
        else:
            per_sample.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(per_sample.detach().mean())

    return step


#: CPU seconds of the last _measure call's steps (process time: on a machine shared with other work it
#: counts this process's own work, where wall time counts everyone's).
LAST_CPU_S: list[float] = []


def _measure(step: Any, device: torch.device, burn_in: int, timed: int) -> tuple[float, float, float, list[float]]:
    """(median ms, peak bytes, last loss, all ms) of ``timed`` steps after ``burn_in`` untimed ones."""
    for _ in range(burn_in):
        step()
    times, peaks, loss = [], [], float("nan")
    LAST_CPU_S.clear()
    for _ in range(timed):
        with PeakMemory(device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            LAST_CPU_S.append(time.process_time() - c0)
        peaks.append(mem.peak)
    return 1e3 * statistics.median(times), max(peaks), loss, [1e3 * t for t in times]


def _model_and_batch(name: str, batch_size: int, device: torch.device) -> tuple[torch.nn.Module,
                                                                              dict[str, torch.Tensor]]:
    """The seeded MAE of ``name`` and one synthetic batch: what every mode of every measurement starts from."""
    cfg = model_config(name)
    base = build_mae(cfg, seed=SEED).to(device)
    g = torch.Generator().manual_seed(SEED)
    images = torch.rand(batch_size, 1, cfg.img_size, cfg.img_size, cfg.img_size, generator=g)
    return base, {"image": images.to(device), "lung_mask": (images > 0.5).float().to(device)}


def bench_config(name: str, batch_size: int, device: torch.device, burn_in: int, timed: int,
                 dp_modes: tuple[str, ...] = DP_MODES) -> list[dict]:
    """Each DP mode between two measurements of the plain step (same process, same batch, same masks).

    A busy machine drifts; the ratio of a mode is to the mean of the plain steps measured just before and
    just after it, and only the plain model and the mode's model are alive at once.
    """
    base, batch = _model_and_batch(name, batch_size, device)
    plain_step = make_step("plain", copy.deepcopy(base), batch, SEED)
    plain = [_measure(plain_step, device, burn_in, timed)]
    records = []
    for mode in dp_modes:
        model = copy.deepcopy(base)
        ms, peak, loss, ms_all = _measure(make_step(mode, model, batch, SEED), device, burn_in, timed)
        del model
        plain.append(_measure(plain_step, device, 0, timed))
        reference = (plain[-2][0] + plain[-1][0]) / 2
        records.append({"config": name, "batch": batch_size, "mode": mode, "ms_per_step": ms, "ms_all": ms_all,
                        "plain_ms_per_step": reference, "ratio_to_plain": ms / reference,
                        "peak_mib": peak / 2 ** 20, "plain_peak_mib": max(p[1] for p in plain) / 2 ** 20,
                        "loss": loss})
    return records


def bench_config_interleaved(name: str, batch_size: int, device: torch.device, burn_in: int,
                             timed: int, dp_modes: tuple[str, ...] = DP_MODES) -> list[dict]:
    """All modes alive at once, one step of each in turn (plain, hooks, functorch, ghost, plain, ...).

    On a machine shared with other work, load changes within seconds; round-robin steps see the same load,
    so the medians compare well. Needs memory for every mode's model and optimizer state at once.
    """
    base, batch = _model_and_batch(name, batch_size, device)
    modes = ("plain",) + tuple(dp_modes)
    steps = {mode: make_step(mode, copy.deepcopy(base), batch, SEED) for mode in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(burn_in):
        for mode in modes:
            steps[mode]()
    for _ in range(timed):
        for mode in modes:
            ms, peak, _, _ = _measure(steps[mode], device, 0, 1)
            times[mode].append(ms)
            cpu[mode].append(LAST_CPU_S[0])
            peaks[mode].append(peak)
    plain = statistics.median(times["plain"])
    plain_cpu = statistics.median(cpu["plain"])
    return [{"config": name, "batch": batch_size, "mode": mode, "ms_per_step": statistics.median(times[mode]),
             "ms_all": times[mode], "plain_ms_per_step": plain,
             "ratio_to_plain": statistics.median(times[mode]) / plain, "peak_mib": max(peaks[mode]) / 2 ** 20,
             "plain_peak_mib": max(peaks["plain"]) / 2 ** 20, "interleaved": True,
             "cpu_s_per_step": statistics.median(cpu[mode]), "plain_cpu_s_per_step": plain_cpu,
             "cpu_ratio_to_plain": statistics.median(cpu[mode]) / plain_cpu} for mode in dp_modes]


def profile_modes(name: str, batch_size: int, device: torch.device, modes: tuple[str, ...], top: int = 22) -> None:
    """Print the self-CPU-time table of one step per mode (after one burn-in step), same batch and masks."""
    from torch.profiler import ProfilerActivity, profile

    base, batch = _model_and_batch(name, batch_size, device)
    for mode in modes:
        step = make_step(mode, copy.deepcopy(base), batch, SEED)
        step()
        c0 = time.process_time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n{name} b{batch_size} {mode}: {time.process_time() - c0:.2f} CPU s under the profiler")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def count_flops(name: str, batch_size: int, device: torch.device, modes: tuple[str, ...]) -> list[dict]:
    """FLOPs of one step per mode (``torch.utils.flop_counter``: matmuls and attention), against the plain step.

    The ratio is the floor of the time ratio where the step is matmul-bound: the DP step cannot be cheaper
    than its extra matmuls (per-sample norms, per-sample gradients) at the plain step's FLOP rate. The
    Gaussian noise (one draw per parameter) and the element-wise passes are not FLOPs counted here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    base, batch = _model_and_batch(name, batch_size, device)
    flops: dict[str, int] = {}
    for mode in ("plain", *modes):
        step = make_step(mode, copy.deepcopy(base), batch, SEED)
        step()  # the optimizer's state exists before the counted step, as in the timed ones
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops[mode] = int(counter.get_total_flops())
    return [{"config": name, "batch": batch_size, "mode": mode, "flops": flops[mode], "plain_flops": flops["plain"],
             "flop_ratio_to_plain": flops[mode] / flops["plain"],
             "noise_draws": sum(p.numel() for p in base.parameters() if p.requires_grad)} for mode in modes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS) + ["paper-p8"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per config, 2)")
    parser.add_argument("--burn-in", type=int, default=BURN_IN)
    parser.add_argument("--timed", type=int, default=TIMED)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write all records here")
    parser.add_argument("--modes", nargs="+", default=list(DP_MODES), choices=DP_MODES + tuple(BK_FORCED),
                        help="DP modes to time (bk-ghost / bk-instantiate: book-keeping with one norm method)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler's top operators of one plain and one step of each "
                             "mode (where the DP step's extra time goes)")
    parser.add_argument("--flops", action="store_true",
                        help="instead of timing: the FLOPs of one step per mode against the plain step's (the "
                             "floor of the time ratio where the step is matmul-bound)")
    parser.add_argument("--interleave", action="store_true",
                        help="keep every mode's model alive and alternate their steps (steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"DP-SGD step vs plain step on {where}; sigma {NOISE_MULTIPLIER}, C {MAX_GRAD_NORM}, "
          f"{args.burn_in} burn-in + {args.timed} timed steps per mode (median); loadavg "
          f"{Path('/proc/loadavg').read_text().split()[:3]}")
    if args.profile:
        for name in args.configs:
            profile_modes(name, args.batch or CONFIGS.get(name, 2), device, ("plain", *args.modes))
        return 0
    if args.flops:
        records = []
        for name in args.configs:
            recs = count_flops(name, args.batch or CONFIGS.get(name, 2), device, tuple(args.modes))
            records += recs
            for r in recs:
                print(f"{r['config']:>10} b{r['batch']}  {r['mode']:<14} {r['flops'] / 1e9:9.1f} GFLOP vs plain "
                      f"{r['plain_flops'] / 1e9:9.1f} GFLOP  x{r['flop_ratio_to_plain']:.3f}   (+ "
                      f"{r['noise_draws'] / 1e6:.1f} M Gaussian draws)", flush=True)
        if args.json is not None:
            from lungmae_core.atomic import atomic_write_json

            atomic_write_json(args.json, {"device": where, "torch": torch.__version__, "records": records})
        return 0
    records = []
    for name in args.configs:
        bench = bench_config_interleaved if args.interleave else bench_config
        recs = bench(name, args.batch or CONFIGS.get(name, 2), device, args.burn_in, args.timed, tuple(args.modes))
        records += recs
        for r in recs:
            print(f"{r['config']:>10} b{r['batch']}  {r['mode']:<9} {r['ms_per_step']:10.1f} ms/step vs plain "
                  f"{r['plain_ms_per_step']:10.1f} ms/step  x{r['ratio_to_plain']:.2f}   peak {r['peak_mib']:8.1f} "
                  f"MiB vs plain {r['plain_peak_mib']:8.1f} MiB"
                  + (f"   CPU time x{r['cpu_ratio_to_plain']:.2f}" if "cpu_ratio_to_plain" in r else ""), flush=True)
    if args.json is not None:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, {"device": where, "torch": torch.__version__, "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
