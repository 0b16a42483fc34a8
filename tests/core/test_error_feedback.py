"""Error feedback: what the encoding dropped comes back in later rounds, persisted atomically per site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lungmae_core.error_feedback import RESIDUAL_FILE, ErrorFeedback
from lungmae_core.wire import unpack_state


@pytest.mark.parametrize("compression", ["int8", "topk"])
def test_sent_sum_tracks_update_sum(tmp_path: Path, compression: str) -> None:
    """Over rounds, sum(sent) = sum(updates) - residual exactly; without feedback top-k loses most of it."""
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(64, 40, generator=g) * 1e-3 + 1e-4, "n": torch.tensor(1)} for _ in range(12)]
    total = sum(u["w"] for u in updates)
    sent = torch.zeros(64, 40)
    for round_ in range(12):
        ef = ErrorFeedback(tmp_path, tag="run/pretrain")  # a fresh object: the ClientApp process may be new
        sent += unpack_state(ef.pack(updates[round_], compression))["w"]
    residual = ErrorFeedback(tmp_path, tag="run/pretrain").load(updates[0])["w"]
    assert torch.allclose(sent + residual, total, atol=1e-5)
    plain = sum(unpack_state(ErrorFeedback(tmp_path / "x", tag=str(i)).pack(u, compression))["w"]
                for i, u in enumerate(updates))  # every round a new tag: no feedback
    assert float((sent - total).norm()) < float((plain - total).norm())


def test_other_tag_or_layout_discards_and_fp32_clears(tmp_path: Path) -> None:
    ef = ErrorFeedback(tmp_path, tag="run/pretrain")
    ef.pack({"w": torch.full((3000,), 1e-4)}, "topk")
    assert (tmp_path / RESIDUAL_FILE).exists() and ef.residual_norm() > 0
    assert ErrorFeedback(tmp_path, tag="run/finetune").load({"w": torch.zeros(3000)}) == {}
    assert ef.load({"w": torch.zeros(10)}) == {}
    assert ef.load({"w": torch.zeros(3000), "b": torch.zeros(2)}) == {}
    ef.pack({"w": torch.zeros(3000)}, "fp32")
    assert not (tmp_path / RESIDUAL_FILE).exists() and ef.residual_norm() == 0.0


def test_damaged_or_non_finite_residual_is_not_kept(tmp_path: Path) -> None:
    (tmp_path / RESIDUAL_FILE).write_bytes(b"not a torch file")
    ef = ErrorFeedback(tmp_path, tag="t")
    assert ef.load({"w": torch.zeros(3)}) == {}
    bad = torch.zeros(3000)
    bad[5] = float("inf")
    ef.pack({"w": bad}, "int8")
    assert not (tmp_path / RESIDUAL_FILE).exists()
