"""The experiment's machinery: FedAvg, nested label subsets, bootstrap intervals, the conv stem, layer decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungmae_core.config import ModelConfig, TrainConfig
from lungmae_core.errors import ConfigError
from lungmae_core.experiment.data import SiteData, labelled_subset
from lungmae_core.experiment.federation import ArrayDataset, fedavg
from lungmae_core.experiment.stats import balanced_accuracy, paired_difference, summarise


def test_fedavg_is_the_example_weighted_mean():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 5.0]))
    assert int(out["n"]) == 3  # integer buffers are not averaged


def test_labelled_subsets_are_nested_and_balanced():
    labels = np.repeat(np.arange(4), 10)
    site = SiteData("s", "scanner", np.zeros((40, 1, 2, 2, 2)), np.zeros((40, 1, 2, 2, 2)), labels, True)
    small, big = labelled_subset(site, 2, seed=1, num_classes=4), labelled_subset(site, 5, seed=1, num_classes=4)
    assert set(small) <= set(big)
    assert np.bincount(labels[big], minlength=4).tolist() == [5, 5, 5, 5]
    assert set(labelled_subset(site, 5, seed=2, num_classes=4)) != set(big)


def test_bootstrap_intervals_cover_the_estimate_and_the_paired_difference_is_signed():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25)
    good = np.eye(4)[y] * 0.9 + 0.025
    noisy = rng.dirichlet(np.ones(4), size=100)
    s = summarise(y, [good], 4, n_boot=200)
    assert s["balanced_accuracy"] == 1.0 and s["balanced_accuracy_ci"][0] <= 1.0 <= s["balanced_accuracy_ci"][1] + 1e-9
    d = paired_difference(y, [good], [noisy], 4, n_boot=300)
    assert d["difference"] > 0.5 and 0 < d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert balanced_accuracy(np.array([0, 0, 1]), np.array([0, 1, 1]), 2) == pytest.approx(0.75)


def test_conv_stem_is_patch_local():
    """Changing the voxels of one patch changes that patch's token only: masking hides as much as before."""
    from lungmae_core.model import ViTEncoder3D

    cfg = ModelConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_dim=32, stem="conv",
                      input_windows=((-1000.0, -900.0),))
    enc = ViTEncoder3D.from_config(cfg)
    x = torch.rand(1, 1, 16, 16, 16)
    y = x.clone()
    y[:, :, :8, :8, 8:] = torch.rand(1, 1, 8, 8, 8)  # patch (0, 0, 1) in raster order: token 1
    tokens_x, tokens_y = enc.embed(x), enc.embed(y)
    changed = (tokens_x - tokens_y).abs().sum(-1)[0] > 1e-6
    assert changed.tolist() == [False, True] + [False] * 6
    with pytest.raises(ConfigError, match="stem"):
        ModelConfig(stem="resnet")


def test_conv_stem_keeps_the_token_scale_of_the_linear_embedding():
    """The conv stem's tokens vary across scans about as much as the linear patch embedding's (both at init).

    With PyTorch's default conv init the three stages shrank the tokens to 0.02 (vs 0.9 linear), and a ViT
    from scratch stayed at chance on the experiment phantoms.
    """
    from lungmae_core.model import ViTEncoder3D

    torch.manual_seed(0)
    x = torch.rand(8, 1, 32, 32, 32)
    spread = {}
    for stem in ("linear", "conv"):
        cfg = ModelConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, stem=stem,
                          input_windows=((-1000.0, -900.0), (-900.0, -500.0)))
        enc = ViTEncoder3D.from_config(cfg)
        with torch.no_grad():
            spread[stem] = float((enc.embed(x) - enc.pos_embed.weight).std(dim=0).mean())
    assert spread["conv"] > 0.4 * spread["linear"], spread


def test_layer_decay_scales_lower_layers_and_the_optimizer_state_carries_over():
    from lungmae_core.heads import ILDClassifier
    from lungmae_core.train import _param_groups, train_classifier

    cfg = ModelConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_dim=32,
                      decoder_embed_dim=16, decoder_num_heads=2, decoder_mlp_dim=32)
    clf = ILDClassifier(cfg, 4, pooling="mean")
    groups = _param_groups(clf, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(clf.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named["encoder.blocks.1.attn.qkv.weight"])] == 0.5
    assert scale[id(named["encoder.patch_embed.weight"])] == 0.125
    with pytest.raises(ConfigError, match="layer_decay"):
        TrainConfig(layer_decay=0.0)
    data = ArrayDataset(np.random.default_rng(0).random((8, 1, 16, 16, 16), dtype=np.float32),
                        np.ones((8, 1, 16, 16, 16), np.uint8), np.arange(8) % 4)
    state: dict = {}
    tcfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, layer_decay=0.75)
    train_classifier(clf, data, tcfg, class_weights=None, optimizer_state=state)
    steps = [float(s["step"]) for s in state["state_dict"]["state"].values()]
    train_classifier(clf, data, tcfg, class_weights=None, optimizer_state=state)
    assert [float(s["step"]) for s in state["state_dict"]["state"].values()] == [v + 2 for v in steps]


def test_intervals_survive_resamples_that_miss_a_class():
    """A small subset (the held-out scanner's 8 patients) often loses a class in a resample: AUC is then
    undefined there, and the summary still comes out (it raised a TypeError before)."""
    from lungmae_core.experiment.stats import summarise

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 2)
    probs = [rng.dirichlet(np.ones(4), size=8)]
    out = summarise(y, probs, 4, n_boot=200, seed=1)
    assert 0.0 <= out["balanced_accuracy_ci"][0] <= out["balanced_accuracy_ci"][1] <= 1.0
    assert 0.0 <= out["roc_auc_ci"][0] <= out["roc_auc_ci"][1] <= 1.0


def _loop_reference(y, probs, n_cls, n_boot, seed, subset=None):
    """The bootstrap as a loop over resampled arrays (what the vectorised one must reproduce)."""
    from lungmae_core.metrics import classification_metrics

    base = np.arange(len(y)) if subset is None else np.flatnonzero(subset)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_boot):
        idx = rng.choice(base, size=len(base))
        ba = np.mean([balanced_accuracy(y[idx], p[idx].argmax(1), n_cls) for p in probs])
        aucs = [classification_metrics(y[idx], p[idx], n_cls)["roc_auc"] for p in probs]
        defined = [a for a in aucs if a is not None]
        rows.append((ba, np.mean(defined) if defined else np.nan))
    rows = np.array(rows)
    return rows


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_bootstrap_equals_the_loop_over_resampled_arrays(ties: bool) -> None:
    rng = np.random.default_rng(3)
    n, n_cls = 30, 4
    y = rng.integers(0, n_cls, n)
    y[:n_cls] = np.arange(n_cls)
    probs = [rng.dirichlet(np.ones(n_cls), n) for _ in range(3)]
    if ties:  # coarse scores: many equal values within a class column
        probs = [np.round(p, 1) for p in probs]
    subset = np.arange(n) % 3 != 0
    for sub in (None, subset):
        ref = _loop_reference(y, probs, n_cls, 120, seed=5, subset=sub)
        got = summarise(y, probs, n_cls, n_boot=120, seed=5, subset=sub)
        assert got["balanced_accuracy_ci"] == pytest.approx(np.percentile(ref[:, 0], [2.5, 97.5]).tolist(), abs=1e-12)
        finite = ref[np.isfinite(ref[:, 1]), 1]
        assert got["roc_auc_ci"] == pytest.approx(np.percentile(finite, [2.5, 97.5]).tolist(), abs=1e-9)
        base = np.arange(n) if sub is None else np.flatnonzero(sub)
        from lungmae_core.metrics import classification_metrics
        assert got["roc_auc"] == pytest.approx(np.mean([classification_metrics(y[base], p[base], n_cls)["roc_auc"]
                                                        for p in probs]), abs=1e-12)
    diff = paired_difference(y, probs[:2], probs[1:], n_cls, n_boot=150, seed=2)
    ref_rng = np.random.default_rng(2)
    boots = []
    for _ in range(150):
        idx = ref_rng.choice(np.arange(n), size=n)
        boots.append(np.mean([balanced_accuracy(y[idx], p[idx].argmax(1), n_cls) for p in probs[:2]])
                     - np.mean([balanced_accuracy(y[idx], p[idx].argmax(1), n_cls) for p in probs[1:]]))
    assert diff["ci"] == pytest.approx(np.percentile(boots, [2.5, 97.5]).tolist(), abs=1e-12)
    assert diff["p_not_above_zero"] == pytest.approx(np.mean(np.asarray(boots) <= 0))
