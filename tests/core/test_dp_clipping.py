"""Book-keeping clipping: the same clipped gradient sum as straightforward per-sample clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lungmae_core.config import model_config
from lungmae_core.dp_clipping import CLIP_EPS, BookkeepingClipper, unsupported_parameters
from lungmae_core.heads import ILDClassifier
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1
from lungmae_core.model import MAE3D, patchify3d

CFG = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_dim=40, decoder_embed_dim=16,
           decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=24)


def _mae() -> MAE3D:
    torch.manual_seed(0)
    return MAE3D(model_config("tiny", **CFG)).double().train()


def _per_sample_loss(model: MAE3D, images: torch.Tensor, seed: int) -> torch.Tensor:
    pred, mask = model(images, generator=torch.Generator().manual_seed(seed))
    lung = lung_fraction_per_patch((images > 0.5).double(), model.cfg.patch_size)
    return lung_weighted_l1(pred, patchify3d(images, model.cfg.patch_size), mask, lung, per_sample=True).total


def _reference(model: nn.Module, per_sample: torch.Tensor, clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sum_i clip(g_i), each g_i from its own backward pass of the same forward."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(per_sample.shape[0]):
        grads = torch.autograd.grad(per_sample[i], params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + CLIP_EPS))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total, torch.stack(norms)


@pytest.mark.parametrize("mode", ["mixed", "ghost", "instantiate"])
@pytest.mark.parametrize("clip", [1e-4, 1e3])  # every sample clipped / none clipped
def test_mae_clipped_sum_matches_per_sample_clipping(mode: str, clip: float) -> None:
    model = _mae()
    images = torch.rand(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, expected_norms = _reference(model, _per_sample_loss(model, images, 5), clip)
    # The lung-weighted loss is float32 (its 1/B would round): sum the per-sample losses here; the mean
    # reduction is checked with the classifier's float64 cross-entropy below.
    clipper = BookkeepingClipper(model, clip, mode=mode, loss_reduction="sum")
    _per_sample_loss(model, images, 5).sum().backward()
    norms = clipper.clip_and_sum()
    assert torch.allclose(norms, expected_norms, rtol=1e-9)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, p, e in zip(names, params, expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-12, rtol=1e-9), name
    assert clipper.captures[0].a is None  # reset for the next step
    if mode == "mixed":
        assert set(clipper.choices.values()) == {"ghost", "instantiate"}


def test_float32_matches_to_1e6() -> None:
    model = _mae().float()
    images = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    expected, _ = _reference(model, _per_sample_loss(model, images, 3), 1e-3)
    clipper = BookkeepingClipper(model, 1e-3)
    _per_sample_loss(model, images, 3).mean().backward()  # the training loop's mean reduction
    clipper.clip_and_sum()
    for p, e in zip(model.parameters(), expected, strict=True):
        assert float((p.grad - e).abs().max()) <= 1e-6


def test_classifier_linear_probe_and_full() -> None:
    torch.manual_seed(0)
    clf = ILDClassifier(model_config("tiny", **CFG), num_classes=3, pooling="mean").double().train()
    images = torch.rand(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    for frozen in (False, True):
        for name, p in clf.named_parameters():
            p.requires_grad_(not (frozen and name.startswith("encoder.")))
        per_sample = nn.functional.cross_entropy(clf(images), labels, reduction="none")
        expected, _ = _reference(clf, per_sample, 0.05)
        clipper = BookkeepingClipper(clf, 0.05)
        nn.functional.cross_entropy(clf(images), labels, reduction="none").mean().backward()
        clipper.clip_and_sum()
        clipper.remove()
        for p, e in zip([p for p in clf.parameters() if p.requires_grad], expected, strict=True):
            assert torch.allclose(p.grad, e, atol=1e-12)
        clf.zero_grad(set_to_none=True)


def test_empty_step_gives_zero_grads_and_unsupported_layers_are_named() -> None:
    model = _mae()
    clipper = BookkeepingClipper(model, 1.0)
    assert clipper.clip_and_sum().numel() == 0
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())
    net = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1))
    assert unsupported_parameters(net) == ["1.weight (Conv1d)", "1.bias (Conv1d)"]
    with pytest.raises(ValueError, match="unsupported layers: 1.weight"):
        BookkeepingClipper(net, 1.0)


def test_opacus_privacy_bookkeeping_mode_matches_hooks_mode() -> None:
    """Through OpacusPrivacy: same clipped sum as Opacus' hooks on the same batch, then noise, steps, the guard."""
    import copy

    from torch.utils.data import DataLoader, default_collate

    from lungmae_core.errors import PrivacyBudgetExceeded
    from lungmae_core.privacy import DPConfig, OpacusPrivacy, plan_round
    from tests.core.test_privacy import Phantoms

    ds = Phantoms(6, seed=2)
    torch.manual_seed(0)
    clf = ILDClassifier(model_config("tiny", img_size=32), num_classes=2)
    plan = plan_round(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=0.8, max_grad_norm=1e-2),
                      num_samples=6, batch_size=3, epochs=1, delta=1e-3)
    sums = {}
    for mode in ("hooks", "bookkeeping"):
        model0 = copy.deepcopy(clf)
        privacy = OpacusPrivacy(plan, grad_sample_mode=mode)  # secret sampling: feed both modes one fixed batch
        model, optimizer, loader = privacy.make_private(
            model0, torch.optim.SGD(model0.parameters(), lr=0.0), DataLoader(ds, batch_size=3))
        batch = default_collate([ds[i] for i in range(3)])
        nn.functional.cross_entropy(model(batch["image"], batch["lung_mask"]), batch["label"]).backward()
        optimizer.step()
        sums[mode] = [p.summed_grad.clone() for p in model0.parameters() if p.requires_grad]
        assert privacy.steps_taken == 1
        if mode == "bookkeeping":
            params = [p for p in model0.parameters() if p.requires_grad]
            noise = torch.cat([(p.grad * optimizer.expected_batch_size - p.summed_grad).flatten() for p in params])
            assert noise.std().item() == pytest.approx(0.8 * 1e-2, rel=0.02)
            for _ in range(plan.steps - 1):
                optimizer.zero_grad()
                optimizer.step()  # noise-only steps
            optimizer.zero_grad()
            with pytest.raises(PrivacyBudgetExceeded):
                optimizer.step()
    for a, b in zip(sums["hooks"], sums["bookkeeping"], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
