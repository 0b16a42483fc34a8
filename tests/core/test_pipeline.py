"""``lungmae train`` end to end on a small prepared cache, the from-scratch baseline, and the phantom cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lungmae_cli.main import main
from lungmae_core.cache import write_sample
from lungmae_core.centralized.data import phantom_dataset
from lungmae_core.config import model_config
from lungmae_core.errors import DatasetError
from lungmae_core.heads import ILDClassifier
from lungmae_core.manifest import ManifestRow, write_manifest
from lungmae_core.preprocess import Sample

MINI_MODEL = """\
img-size: 16
patch-size: 4
embed-dim: 48
depth: 2
num-heads: 2
mlp-dim: 96
decoder-embed-dim: 32
decoder-depth: 1
decoder-num-heads: 2
decoder-mlp-dim: 64
"""
CLASSES = ("normal", "ggo", "fibrosis", "emphysema")
SMALL = (48, 64, 64)  # phantom grid over the usual field of view: quick to generate


@pytest.fixture()
def site_cache(tmp_path: Path) -> Path:
    """A prepared cache of 16**3 scans: 8 train, 4 val, 4 test labelled (class = intensity), 2 unlabelled."""
    cache = tmp_path / "cache"
    rng = np.random.default_rng(0)
    rows = []
    plan = [("train", i % 4) for i in range(8)] + [("val", i) for i in range(4)] + [("test", i) for i in range(4)]
    plan += [("train", -1), ("train", -1)]
    for i, (split, label) in enumerate(plan):
        lung = np.zeros((1, 16, 16, 16), np.uint8)
        lung[0, 3:13, 3:13, 3:13] = 1
        image = (0.2 + 0.15 * max(label, 0) * lung + 0.05 * rng.random((1, 16, 16, 16))).astype(np.float32)
        key = f"{i:032x}"
        write_sample(cache, key, Sample(image=image, lung_mask=lung, qc={}))
        rows.append(ManifestRow(series_id=f"s{i:03d}", patient_id=f"p{i:03d}", study_id=f"t{i:03d}", source="test",
                                status="accepted", label=CLASSES[label] if label >= 0 else "", split=split,
                                cache_file=f"samples/{key}.npz", cache_key=key))
    write_manifest(cache, rows)
    return cache


def _train(tmp_path: Path, cache: Path, *extra: str) -> tuple[int, Path]:
    model = tmp_path / "mini.yaml"
    model.write_text(MINI_MODEL)
    workdir = tmp_path / "run"
    rc = main(["train", "--cache", str(cache), "--model", str(model), "--workdir", str(workdir), "--device", "cpu",
               "--pretrain-epochs", "2", "--finetune-epochs", "3", "--finetune-lr", "3e-3", "--batch-size", "4",
               "--quiet", *extra])
    return rc, workdir


def test_train_on_a_prepared_cache_writes_metrics_and_checkpoints(tmp_path: Path, site_cache: Path, capsys) -> None:
    rc, workdir = _train(tmp_path, site_cache)
    assert rc == 0
    out = capsys.readouterr().out
    assert "test  accuracy" in out and "mean-anatomy baseline" in out and str(workdir / "metrics.json") in out
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["data"] == {"scans": 18, "rejected": 0, "pretrain": 14, "train": 8, "val": 4, "test": 4}
    assert metrics["pretrained"] is True and 1 <= metrics["best_epoch"] <= 3
    for key in ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc"):
        assert 0.0 <= metrics["final"][key] <= 1.0
    assert np.asarray(metrics["final"]["confusion_matrix"]).sum() == 4
    assert set(metrics["reconstruction"]) >= {"l1_masked", "l1_masked_lung", "baseline_l1_masked",
                                              "baseline_l1_masked_lung", "beats_baseline"}
    lines = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert [(x["phase"], x["epoch"]) for x in lines] == [("pretrain", 1), ("pretrain", 2),
                                                         ("finetune", 1), ("finetune", 2), ("finetune", 3)]
    ckpt = torch.load(workdir / "checkpoints" / "classifier.pt", weights_only=True)
    clf = ILDClassifier(model_config("tiny", **ckpt["model_args"]), ckpt["num_classes"], pooling=ckpt["pooling"])
    clf.load_state_dict(ckpt["model"])  # checkpoints describe themselves
    assert ckpt["epoch"] == metrics["best_epoch"]
    mae = torch.load(workdir / "checkpoints" / "mae.pt", weights_only=True)
    assert not torch.equal(mae["model"]["encoder.patch_embed.weight"], ckpt["model"]["encoder.patch_embed.weight"])
    assert not list(workdir.rglob("*.tmp"))


def test_no_pretrain_is_the_scratch_baseline(tmp_path: Path, site_cache: Path) -> None:
    rc, workdir = _train(tmp_path, site_cache, "--no-pretrain", "--finetune-mode", "full", "--pooling", "cls")
    assert rc == 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["pretrained"] is False and metrics["config"]["pretrain"] is None
    assert metrics["reconstruction"] is None  # no MAE to judge
    assert not (workdir / "checkpoints" / "mae.pt").exists()


def test_missing_cache_is_one_clear_line(tmp_path: Path, capsys) -> None:
    rc, _ = _train(tmp_path, tmp_path / "nowhere")
    assert rc == 2
    assert f"Unable to load the cache {tmp_path / 'nowhere'} as it does not exist" in capsys.readouterr().err


def test_phantoms_are_generated_once_then_read_from_the_workdir(tmp_path: Path, monkeypatch) -> None:
    first, rejected = phantom_dataset(4, size=16, seed=0, cache_dir=tmp_path, workers=1, shape=SMALL)
    assert list(first.labels) == [0, 1, 2, 3] and rejected == []
    assert first[0]["image"].shape == (1, 16, 16, 16) and first[0]["lung_mask"].sum() > 0

    def no_generation(job):
        raise AssertionError("phantom regenerated although cached")

    monkeypatch.setattr("lungmae_core.centralized.data._phantom_job", no_generation)
    again, _ = phantom_dataset(4, size=16, seed=0, cache_dir=tmp_path, workers=1, shape=SMALL)
    assert all(torch.equal(first[i]["image"], again[i]["image"]) for i in range(4))
    with pytest.raises(DatasetError, match="scans must be >= 4 \\(one per class\\); got 3"):
        phantom_dataset(3, size=16, cache_dir=tmp_path)
