"""Checkpoints: atomic save, resume of the latest, refusal of corrupt or foreign ones, export manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.checkpoints import Checkpoint, CheckpointError, CheckpointStore, export_model, sha256_file


def _ckpt(step: int, phase: str = "pretrain", h: str = "abc") -> Checkpoint:
    return Checkpoint(step_index=step, phase=phase, server_round=step + 1, weights={"w": torch.full((3,), float(step))},
                      strategy_state={"counters": {"failed": {"a": 1}}}, history=[{"round": step + 1}],
                      config_hash=h, model_args={"num_classes": 4})


def test_save_load_prune(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.load_latest("abc") is None
    for step in range(4):
        store.save(_ckpt(step))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")) == ["step-0002.pt", "step-0003.pt"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))
    got = store.load_latest("abc")
    assert got is not None and got.step_index == 3 and torch.equal(got.weights["w"], torch.full((3,), 3.0))
    assert got.strategy_state["counters"]["failed"] == {"a": 1} and got.history == [{"round": 4}]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["sha256"] == sha256_file(tmp_path / state["checkpoint"])


def test_refuses_other_config_and_corruption(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_ckpt(0))
    with pytest.raises(CheckpointError, match="started with another federation config"):
        store.load_latest("other")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is corrupt"):
        store.load_latest("abc")
    path.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        store.load_latest("abc")
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        store.load_latest("abc")


def test_export_manifest(tmp_path: Path) -> None:
    manifest = export_model(tmp_path, {"w": torch.ones(2, 2)}, {"participating_sites": ["a", "b"], "rounds": []})
    data = json.loads(manifest.read_text())
    assert data["files"]["model.pt"]["sha256"] == sha256_file(tmp_path / "model" / "model.pt")
    assert data["participating_sites"] == ["a", "b"] and data["num_parameters"] == 4
    assert data["code_version"].startswith("lungmae-fl ")
    assert torch.equal(torch.load(tmp_path / "model" / "model.pt", weights_only=True)["w"], torch.ones(2, 2))
