"""Time one MAE training step (forward, lung-weighted L1, backward, AdamW) of our MAE3D against MONAI's.

Usage::

    python benchmarks/mae_step.py                       # tiny (batch 2) and paper-p16 (batch 1)
    python benchmarks/mae_step.py --configs tiny paper-p16 paper-p8 --timed 3 --burn-in 2 --threads 2
    python benchmarks/mae_step.py --configs paper-p16 paper-p8 --device cuda    # bf16 autocast, MFU

Every model of a config is built in this process and the steps are interleaved (ours, MONAI default,
MONAI with ``use_flash_attention``, ours again, ...) so that a noisy machine slows all of them alike. MONAI's
``MaskedAutoEncoderViT`` is configured to the same sizes: linear ("perceptron") patch embedding, learnable
position embeddings, QKV bias; it builds plain einsum attention, and setting ``use_flash_attention`` on its
attention blocks after construction switches them to SDPA. Peak memory is the CUDA allocator's peak on GPU;
on CPU it is the bytes autograd saves for backward (activations, deduplicated by storage), the part that
differs between implementations, plus parameters, gradients and AdamW state. Achieved FLOP/s uses the
FLOPs that ``torch.utils.flop_counter`` counts for one step and is compared with a measured matmul peak of
the same precision on the same device, in the same run: on a GPU the step runs under bf16 autocast as
training does (``--amp bf16``, the default there) and the fraction is the model FLOP utilisation (MFU)
against a bf16 matmul; on CPU it runs in fp32 (``--amp none``, the default there) against an fp32 matmul.

Prints one summary line per config and model (median and minimum step time: on a shared machine the minimum
is the steadier figure), and writes a JSON record (``--json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungmae_core.config import ModelConfig, model_config  # noqa: E402
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1  # noqa: E402
from lungmae_core.model import MAE3D, patchify3d  # noqa: E402

# -- config block (nanoGPT bench.py style) ------------------------------------------------------------------
CONFIGS = {"tiny": 2, "paper-p16": 1, "paper-p8": 1}  # config -> batch size
BURN_IN = 2
TIMED = 3
SEED = 0


def monai_mae(cfg: ModelConfig, flash: bool) -> torch.nn.Module:
    """MONAI's MaskedAutoEncoderViT at our sizes; ``flash`` sets ``use_flash_attention`` on every block."""
    from monai.networks.nets import MaskedAutoEncoderViT

    net = MaskedAutoEncoderViT(
        in_channels=cfg.in_chans, img_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.embed_dim,
        mlp_dim=cfg.mlp_dim, num_layers=cfg.depth, num_heads=cfg.num_heads, masking_ratio=cfg.mask_ratio,
        decoder_hidden_size=cfg.decoder_embed_dim, decoder_mlp_dim=cfg.decoder_mlp_dim,
        decoder_num_layers=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, proj_type="perceptron",
        pos_embed_type="learnable", decoder_pos_embed_type="learnable", qkv_bias=True)
    if flash:
        n = 0
        for module in net.modules():
            if hasattr(module, "use_flash_attention"):
                module.use_flash_attention = True
                n += 1
        assert n == cfg.depth + cfg.decoder_depth, n
    return net


class Runner:
    """One model, its optimizer and a fixed synthetic batch; ``step()`` is one full training step."""

    def __init__(self, name: str, model: torch.nn.Module, cfg: ModelConfig, batch: int, device: torch.device,
                 ours: bool, amp: str = "none") -> None:
        self.name, self.cfg, self.device, self.ours = name, cfg, device, ours
        self.amp = amp
        self.model = model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator().manual_seed(SEED)
        self.images = torch.rand(batch, 1, cfg.img_size, cfg.img_size, cfg.img_size, generator=g).to(device)
        self.lung = (self.images > 0.5).float()
        self.gen = torch.Generator().manual_seed(SEED)
        self.times: list[float] = []
        #: why torch.compile was given up for eager execution ("" while compiled code runs, or never compiled)
        self.fallback = ""

    def loss(self) -> torch.Tensor:
        # the forward under bf16 autocast, the loss outside it, as lungmae_core.train runs a step on a GPU
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            if self.ours:
                pred, mask = self.model(self.images, generator=self.gen)
            else:
                pred, mask = self.model(self.images)
        target = patchify3d(self.images, self.cfg.patch_size)
        return lung_weighted_l1(pred, target, mask, lung_fraction_per_patch(self.lung, self.cfg.patch_size)).total

    def step(self) -> None:
        try:
            self.loss().backward()
        except Exception as exc:  # noqa: BLE001 - torch.compile's failures (no compiler, a graph break error)
            original = getattr(self.model, "_orig_mod", None)
            if original is None:
                raise
            # the fallback: the same module (same parameters, same optimizer) run eagerly
            self.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"{self.name}: torch.compile failed ({self.fallback}); falling back to eager", flush=True)
            self.model = original
            self.optimizer.zero_grad(set_to_none=True)
            self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return int(counter.get_total_flops())

    def peak_bytes(self) -> int:
        """CUDA: allocator peak of one step. CPU: saved activations + params, grads and AdamW state."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            return int(torch.cuda.max_memory_allocated(self.device))
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(storages.values()) + 4 * self.params * 4  # weights, grads, exp_avg, exp_avg_sq


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 5, amp: str = "none") -> float:
    """Best FLOP/s of an n x n matmul in the step's precision: the machine's practical peak for these models."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    if device.type == "cuda":
        n = max(n, 8192)  # a GPU needs a larger problem to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call: kernel selection, not timed
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def bench_config(name: str, batch: int, device: torch.device, burn_in: int, timed: int,
                 variants: list[str], peak: float, amp: str = "none") -> dict:
    cfg = model_config(name)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "ours": lambda: MAE3D(cfg),
        "monai": lambda: monai_mae(cfg, flash=False),
        "monai-flash": lambda: monai_mae(cfg, flash=True),
        "ours-compiled": lambda: torch.compile(MAE3D(cfg)),
    }
    runners = []
    for variant in variants:
        torch.manual_seed(SEED)
        runners.append(Runner(variant, builders[variant](), cfg, batch, device, ours=variant.startswith("ours"),
                              amp=amp))
    # Burn-in steps double as the measuring steps: the first records peak memory, the second counts FLOPs
    # (neither is timed), so a slow config such as paper-p8 needs no extra steps.
    peaks: dict[str, int | None] = {}
    flops: dict[str, int] = {}
    failed: dict[str, str] = {}
    for i in range(max(burn_in, 2)):
        for r in list(runners):
            compiled = r.name == "ours-compiled"  # the counters do not see inside compiled code
            try:
                if i == 0:
                    peaks[r.name] = None if compiled else r.peak_bytes()
                elif i == 1 and not compiled:
                    flops[r.name] = r.flops()
                else:
                    r.step()
            except RuntimeError as exc:
                if r.ours:
                    raise
                # a reference that cannot run here (MONAI's MAE under bf16 autocast: its index_put mixes dtypes)
                failed[r.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"{name} {r.name}: left out, its step fails ({failed[r.name]})", flush=True)
                runners.remove(r)
    for _ in range(timed):  # interleaved
        for r in runners:
            r.timed_step()
    record = {"config": name, "batch": batch, "amp": amp, "models": {}, "failed": failed}
    ours_median = statistics.median(runners[0].times)
    for r in runners:
        median = statistics.median(r.times)
        step_flops = flops.get(r.name, flops[runners[0].name])  # compiled: same math as ours
        record["models"][r.name] = {
            "median_s": median, "min_s": min(r.times), "times_s": r.times, "params": r.params,
            "peak_bytes": peaks[r.name],
            "flops_per_step": step_flops, "achieved_flops": step_flops / median,
            "fraction_of_matmul_peak": step_flops / median / peak, "speedup_of_ours": median / ours_median,
            "compile_fallback": r.fallback,
        }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "paper-p16"], choices=sorted(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["ours", "monai", "monai-flash"],
                        choices=["ours", "monai", "monai-flash", "ours-compiled"],
                        help="'ours' first: ratios are against it; ours-compiled is torch.compile(MAE3D) "
                             "(slow to build)")
    parser.add_argument("--burn-in", type=int, default=BURN_IN,
                        help="untimed steps per model (at least 2: they measure peak memory and FLOPs)")
    parser.add_argument("--timed", type=int, default=TIMED)
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every config (default: per config, tiny 2, paper-p16/p8 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                        help="bf16 autocast (training's on a GPU) or fp32; auto: bf16 on cuda, none on cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    peak_before = matmul_peak(device, amp=amp)
    records = []
    for name in args.configs:
        records.append(bench_config(name, args.batch or CONFIGS[name], device, args.burn_in, args.timed,
                                    args.variants, peak_before, amp))
    peak = max(peak_before, matmul_peak(device, amp=amp))
    precision = "bf16" if amp == "bf16" else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{precision} matmul peak {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}); steps in {precision}"
          + (" (autocast)" if amp == "bf16" else ""))
    for rec in records:
        for model_name, m in rec["models"].items():
            m["fraction_of_matmul_peak"] = m["achieved_flops"] / peak
            print(f"{rec['config']:>9} b{rec['batch']} {model_name:<11} median {m['median_s'] * 1000:9.1f} ms/step"
                  f" (min {m['min_s'] * 1000:9.1f})"
                  f"  time vs ours {m['speedup_of_ours']:5.2f}x  params {m['params'] / 1e6:7.2f} M"
                  f"  peak {'   n/a' if m['peak_bytes'] is None else format(m['peak_bytes'] / 2 ** 30, '6.2f')} GiB"
                  f"  {m['achieved_flops'] / 1e9:7.1f} GFLOP/s = {100 * m['fraction_of_matmul_peak']:5.1f}% of peak"
                  + (" (MFU)" if amp == "bf16" else ""))
    payload = {"device": str(device), "device_name": name, "torch": torch.__version__, "amp": amp,
               "threads": torch.get_num_threads(), "matmul_peak_flops": peak, "burn_in": args.burn_in,
               "timed": args.timed, "records": records}
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
