"""Bytes and coding time of a trained update as it travels: int8 bundle deflated, beside the plain bundles.

Usage::

    python benchmarks/update_coding.py                       # paper-p16, 3 local AdamW steps
    python benchmarks/update_coding.py --configs tiny paper-p16 --steps 5 --json update_coding.json

For each model config: build the MAE, take ``--steps`` AdamW steps (lr 1e-3, random CT-like cubes,
batch 1) from its initial weights, and take ``trained - initial`` as the update, as a site does after a
round (an update's values, not random numbers, decide what Huffman coding saves). Then, for each way
an update can travel (fp16 and int8 plain bundles, the reference; int8 deflated, what contract 5 sends):
the payload bytes as a share of the fp32 update, the site's time to pack and bundle it, and the server's
time to unbundle (and inflate) and unpack it, each the median of ``--repeats`` runs in this process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _update(config: str, steps: int, seed: int):
    import torch

    from lungmae_core.loss import mae_target, masked_l1
    from lungmae_core.model import build_mae
    from lungmae_core.wire import state_delta

    model = build_mae(config, seed=seed)
    cfg = model.cfg
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, cfg.img_size, generator=g)
        pred, mask = model(x)
        loss = masked_l1(pred, mae_target(x, cfg.patch_size, normalized=True), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return state_delta(model.state_dict(), before)


def _median_s(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(config: str, steps: int, repeats: int, seed: int) -> list[dict]:
    from lungmae_core.bundle import bundle, payload_nbytes, unbundle
    from lungmae_core.wire import pack_state, state_nbytes, unpack_state

    update = _update(config, steps, seed)
    fp32 = state_nbytes(update)
    rows = []
    for label, compression, deflate in (("fp16 bundle", "fp16", False), ("int8 bundle (contract 4)", "int8", False),
                                        ("int8 bundle, deflated (contract 5)", "int8", True)):
        send_s, arrays = _median_s(lambda c=compression, d=deflate: bundle(pack_state(update, c), deflate=d), repeats)
        recv_s, _ = _median_s(lambda d=deflate, a=arrays: unpack_state(unbundle(a, deflate=d)), repeats)
        rows.append({"config": config, "wire": label, "share_of_fp32": payload_nbytes(arrays) / fp32,
                     "mib": payload_nbytes(arrays) / 2**20, "site_pack_s": send_s, "server_unpack_s": recv_s})
        del arrays
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["paper-p16"])
    parser.add_argument("--steps", type=int, default=3, help="local AdamW steps that make the update")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"loadavg {[round(x, 2) for x in os.getloadavg()]}; {args.steps} AdamW steps per update; "
          f"median of {args.repeats}")
    rows = []
    for config in args.configs:
        for row in measure(config, args.steps, args.repeats, args.seed):
            rows.append(row)
            print(f"{row['config']:>10} {row['wire']:<36} {100 * row['share_of_fp32']:5.1f}% of fp32 "
                  f"({row['mib']:7.1f} MiB); site pack {row['site_pack_s']:6.2f} s; server unpack "
                  f"{row['server_unpack_s']:6.2f} s")
    print(f"loadavg {[round(x, 2) for x in os.getloadavg()]}")
    if args.json:
        from lungmae_core.atomic import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
