"""The paper's lung-area-weighted L1 reconstruction loss over masked patches, and plain masked L1.

Among the MASKED patches only, a patch is "lung" when more than ``lung_threshold`` (25%) of its voxels are
lung in the lung mask (patchified in the same token order as the image); the others are "non-lung":

    loss = mean L1 over lung patches + w * mean L1 over non-lung patches        (w = 0.01 in the paper)

Two poolings are offered:

* :func:`lung_weighted_l1` pools each mean over the whole batch (the paper's loss, used without DP): every
  masked lung patch of the batch counts once, so a sample with more lung patches weighs more.
* ``lung_weighted_l1(..., per_sample=True)`` computes each sample's own lung and non-lung means, giving one
  loss per sample. DP-SGD needs this form: a sample's gradient must depend on that sample only (with batch pooling
  the denominators mix in the other samples' lung counts), and Opacus expects the batch loss to be the mean
  of per-sample losses. On a batch of one both forms agree.

The known defects of the public code are fixed here: the selection masks are float before averaging, an
empty lung or non-lung set contributes 0 instead of NaN, and the patch size comes from the caller's config.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lungmae_core.model import patchify3d

__all__ = ["LossParts", "lung_fraction_per_patch", "lung_weighted_l1", "mae_target", "masked_l1",
           "normalize_patches", "patch_l1"]


class LossParts(NamedTuple):
    """The loss and its parts; scalars for batch pooling, ``(B,)`` tensors for the per-sample form.

    ``total`` = ``lung`` + w * ``non_lung``; ``n_lung``/``n_non_lung`` count the masked patches in each set.
    """

    total: torch.Tensor
    lung: torch.Tensor
    non_lung: torch.Tensor
    n_lung: torch.Tensor
    n_non_lung: torch.Tensor


def lung_fraction_per_patch(lung_mask: torch.Tensor, p: int) -> torch.Tensor:
    """Fraction of lung voxels in each patch.

    Args:
        lung_mask: (B, 1, D, H, W) 0/1 (any dtype), aligned with the image.
        p: patch side in voxels (``ModelConfig.patch_size``).

    Returns:
        (B, L) float32 in [0, 1], in the token order of :func:`~lungmae_core.model.patchify3d`.
    """
    return patchify3d(lung_mask.float(), p).mean(dim=-1)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean, over its standard deviation: MAE's "normalized pixels" target.

    He et al. ("Masked Autoencoders Are Scalable Vision Learners", 2022) found that predicting each masked
    patch's normalized voxels, not its raw intensities, gives better features for fine-tuning: the encoder
    is no longer rewarded for the patch's mean density, which the visible neighbours and the mean anatomy
    already give away, but for its texture and contrast. A flat patch (variance 0) becomes zeros, up to its
    rounding error over ``sqrt(eps)``.

    Args:
        patches: (B, L, P) voxels (``patchify3d`` of the image). eps: added to the variance.

    Returns:
        (B, L, P) float32.

    Examples:
        >>> x = normalize_patches(torch.tensor([[[1.0, 3.0], [2.0, 2.0]]]))
        >>> x.tolist()
        [[[-0.9999995231628418, 0.9999995231628418], [0.0, 0.0]]]
    """
    x = patches.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def mae_target(images: torch.Tensor, p: int, normalized: bool = False) -> torch.Tensor:
    """What the MAE reconstructs: the image's patches, raw or normalized (:func:`normalize_patches`).

    One definition for training and evaluation, so an MAE is always scored against what it was trained on.

    Args:
        images: (B, C, D, H, W). p: patch side (``ModelConfig.patch_size``). normalized: the
            ``TrainConfig.norm_pix_target`` choice.

    Returns:
        (B, L, P) in :func:`~lungmae_core.model.patchify3d` order.
    """
    patches = patchify3d(images, p)
    return normalize_patches(patches) if normalized else patches


def patch_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per patch: pred, target (B, L, P) -> (B, L) float32."""
    assert pred.shape == target.shape, f"pred {tuple(pred.shape)} != target {tuple(target.shape)}"
    return (pred.float() - target.float()).abs().mean(dim=-1)


def _selections(mask: torch.Tensor, lung_frac: torch.Tensor,
                lung_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (B, L) selections of masked lung and masked non-lung patches."""
    assert mask.shape == lung_frac.shape, f"mask {tuple(mask.shape)} != lung_frac {tuple(lung_frac.shape)}"
    masked = mask.float()
    is_lung = (lung_frac > lung_threshold).float()
    return masked * is_lung, masked * (1.0 - is_lung)


def _mean(values: torch.Tensor, weights: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and count; an empty set gives 0 (not NaN) and a count of 0."""
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    total = (values * weights).sum() if dim is None else (values * weights).sum(dim=dim)
    return total / count.clamp_min(1.0), count


def lung_weighted_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    lung_frac: torch.Tensor,
    non_lung_weight: float = 0.01,
    lung_threshold: float = 0.25,
    *,
    per_sample: bool = False,
) -> LossParts:
    """The paper's loss, its two means pooled over the batch or, with ``per_sample``, over each sample alone.

    Args:
        pred: (B, L, P) predicted voxels. target: (B, L, P) true voxels (``patchify3d`` of the image).
        mask: (B, L), 0 keep / 1 masked; only masked patches count.
        lung_frac: (B, L) lung fraction per patch (:func:`lung_fraction_per_patch`).
        non_lung_weight: w. Defaults to 0.01.
        lung_threshold: a patch is lung when its fraction is strictly above this. Defaults to 0.25.
        per_sample: each sample's own lung and non-lung means, one loss per sample (what DP-SGD needs; the
            batch loss for Opacus is then ``total.mean()``). ``False`` (the paper's loss, without DP): each
            mean pooled over the whole batch.

    Returns:
        LossParts of 0-dim tensors, or of (B,) tensors with ``per_sample``; a part whose set is empty is 0.

    Examples:
        >>> pred, target = torch.zeros(1, 2, 8), torch.ones(1, 2, 8)
        >>> lung_weighted_l1(pred, target, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), 0.5).total
        tensor(1.5000)
    """
    l1 = patch_l1(pred, target)  # (B, L)
    lung_sel, non_sel = _selections(mask, lung_frac, lung_threshold)
    dim = 1 if per_sample else None
    lung, n_lung = _mean(l1, lung_sel, dim=dim)
    non_lung, n_non = _mean(l1, non_sel, dim=dim)
    return LossParts(lung + non_lung_weight * non_lung, lung, non_lung, n_lung, n_non)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain L1 over all masked patches, pooled over the batch (the paper's validation loss).

    Args:
        pred, target: (B, L, P). mask: (B, L), 0 keep / 1 masked.

    Returns:
        0-dim float32 tensor; 0 when nothing is masked.
    """
    return _mean(patch_l1(pred, target), mask.float())[0]
