"""Lung-weighted L1 loss on hand-computed cases: all-lung, no-lung, mixed, w = 0 and 1, empty sets."""

from __future__ import annotations

import pytest
import torch

from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1, masked_l1

# Two samples, four patches of two voxels. Target 0; prediction gives each patch an L1 of its value.
ERR = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
PRED = ERR.unsqueeze(-1).repeat(1, 1, 2)
TARGET = torch.zeros_like(PRED)
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])  # patch 4 of sample 0, patch 2 of sample 1 kept


@pytest.mark.parametrize("case, lung_frac, w, total, lung, non_lung, n_lung, n_non", [
    # all lung: mean over the 6 masked patches = (1+2+3+5+7+8)/6 = 26/6
    ("all-lung", torch.ones(2, 4), 0.01, 26 / 6, 26 / 6, 0.0, 6, 0),
    # no lung: the lung term is 0 (not NaN); total = w * 26/6
    ("no-lung", torch.zeros(2, 4), 0.01, 0.01 * 26 / 6, 0.0, 26 / 6, 0, 6),
    # mixed: lung = patches {1, 2} of sample 0 and {1} of sample 1 -> (1+2+5)/3; non-lung (3+7+8)/3
    ("mixed", torch.tensor([[0.9, 0.3, 0.0, 1.0], [0.5, 1.0, 0.25, 0.1]]), 0.01, 8 / 3 + 0.01 * 6, 8 / 3, 6.0, 3, 3),
    ("mixed w=0", torch.tensor([[0.9, 0.3, 0.0, 1.0], [0.5, 1.0, 0.25, 0.1]]), 0.0, 8 / 3, 8 / 3, 6.0, 3, 3),
    ("mixed w=1", torch.tensor([[0.9, 0.3, 0.0, 1.0], [0.5, 1.0, 0.25, 0.1]]), 1.0, 8 / 3 + 6.0, 8 / 3, 6.0, 3, 3),
])
def test_lung_weighted_l1_hand_cases(case, lung_frac, w, total, lung, non_lung, n_lung, n_non) -> None:
    parts = lung_weighted_l1(PRED, TARGET, MASK, lung_frac, non_lung_weight=w)
    assert parts.total.item() == pytest.approx(total), case
    assert parts.lung.item() == pytest.approx(lung), case
    assert parts.non_lung.item() == pytest.approx(non_lung), case
    assert (parts.n_lung.item(), parts.n_non_lung.item()) == (n_lung, n_non), case


def test_threshold_is_strict_and_configurable() -> None:
    frac = torch.full((2, 4), 0.25)  # exactly 25% is NOT lung ("more than 25%")
    assert lung_weighted_l1(PRED, TARGET, MASK, frac).n_lung.item() == 0
    assert lung_weighted_l1(PRED, TARGET, MASK, frac, lung_threshold=0.2).n_lung.item() == 6


def test_unmasked_patches_never_count() -> None:
    pred = PRED.clone()
    pred[0, 3] = 1000.0  # a kept patch: any error there is ignored
    assert lung_weighted_l1(pred, TARGET, MASK, torch.ones(2, 4)).total.item() == pytest.approx(26 / 6)


def test_per_sample_variant_uses_each_samples_own_means() -> None:
    frac = torch.tensor([[0.9, 0.3, 0.0, 1.0], [0.5, 1.0, 0.25, 0.1]])
    parts = lung_weighted_l1(PRED, TARGET, MASK, frac, non_lung_weight=1.0, per_sample=True)
    # sample 0: lung {1, 2} -> 1.5, non-lung {3} -> 3; sample 1: lung {5} -> 5, non-lung {7, 8} -> 7.5
    assert parts.lung.tolist() == pytest.approx([1.5, 5.0])
    assert parts.non_lung.tolist() == pytest.approx([3.0, 7.5])
    assert parts.total.tolist() == pytest.approx([4.5, 12.5])
    assert parts.n_lung.tolist() == [2, 1]
    one = lung_weighted_l1(PRED[:1], TARGET[:1], MASK[:1], frac[:1], 1.0)  # batch of one: both forms agree
    assert one.total.item() == pytest.approx(parts.total[0].item())


def test_empty_sets_give_zero_and_finite_gradients() -> None:
    pred = PRED.clone().requires_grad_(True)
    for per_sample in (False, True):
        nothing_masked = torch.zeros(2, 4)
        parts = lung_weighted_l1(pred, TARGET, nothing_masked, torch.ones(2, 4), per_sample=per_sample)
        assert torch.all(parts.total == 0)
        parts.total.sum().backward()
        assert torch.isfinite(pred.grad).all()
        pred.grad = None


def test_lung_fraction_per_patch_and_masked_l1() -> None:
    lung = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    lung[0, 0, :2, :2, :2] = 1  # fills patch 0 of a 2x2x2 grid of 2**3 patches
    lung[0, 0, 3, 3, 3] = 1  # one voxel of patch 7
    frac = lung_fraction_per_patch(lung, 2)
    assert frac.dtype == torch.float32
    assert frac.tolist() == [[1.0, 0, 0, 0, 0, 0, 0, 0.125]]
    assert masked_l1(PRED, TARGET, MASK).item() == pytest.approx(26 / 6)
    assert masked_l1(PRED, TARGET, torch.zeros(2, 4)).item() == 0.0


def test_normalized_patches_have_zero_mean_and_unit_spread_and_flat_patches_become_zero() -> None:
    from lungmae_core.loss import normalize_patches

    x = torch.rand(2, 5, 64) * 3 + 1
    x[1, 2] = 0.7  # a flat patch
    y = normalize_patches(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 5), atol=1e-3)
    spread = y.std(-1, unbiased=False)
    assert torch.allclose(spread[0], torch.ones(5), atol=1e-4) and float(spread[1, 2]) < 1e-3
    assert torch.isfinite(y).all()
