"""The hand-off draws the new head from a local generator: the global torch RNG is left alone."""

from __future__ import annotations

from pathlib import Path

import torch

from lungmae_core.model import build_mae
from server.federation_config import federation_from_mapping
from server.runner import FederationRunner


def _runner(tmp_path: Path, seed: int, pooling: str = "cls") -> FederationRunner:
    cfg = federation_from_mapping({"model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 1,
                                                                           "decoder-depth": 1}, "pooling": pooling},
                                   "run-dir": str(tmp_path / f"run{seed}"), "seed": seed}, source="test")
    return FederationRunner(cfg, grid=None)  # type: ignore[arg-type]


def test_handoff_is_seeded_locally_and_keeps_the_global_rng(tmp_path: Path) -> None:
    runner = _runner(tmp_path, seed=3)
    mae = {k: v.clone() for k, v in build_mae(runner.model_cfg, seed=0).state_dict().items()}
    torch.manual_seed(12345)
    before = torch.get_rng_state()
    first = runner.handoff(mae)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from (or seeded into) the global generator
    torch.manual_seed(999)  # whatever the global state, the same run seed gives the same head
    second = runner.handoff(mae)
    for key in ("head.weight", "cls_token.weight"):
        assert torch.equal(first[key], second[key])
    other = _runner(tmp_path, seed=4).handoff(mae)
    assert not torch.equal(first["head.weight"], other["head.weight"])
    assert all(torch.equal(first[k], mae[k]) for k in mae if k.startswith("encoder.") and k in first)
    assert any(k.startswith("decoder") for k in mae) and not any(k.startswith("decoder") for k in first)
