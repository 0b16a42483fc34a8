"""Augmentation of the paper, applied to a CT image and its lung mask together so they stay aligned.

Random flip of each spatial axis (p = 0.1 each) and one random 90-degree rotation (p = 0.1) in a random
plane, as in PAPER.md. Randomness comes from the caller's ``torch.Generator`` so any step can be replayed.
"""

from __future__ import annotations

import torch

__all__ = ["random_flip_rot90", "random_flip_rot90_batch"]

# Planes of a rotation, as pairs of spatial axes counted from the end: (D, H), (D, W), (H, W).
_PLANES = ((-3, -2), (-3, -1), (-2, -1))


def random_flip_rot90(
    image: torch.Tensor,
    lung_mask: torch.Tensor,
    generator: torch.Generator,
    flip_p: float = 0.1,
    rot90_p: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each spatial axis with probability ``flip_p``, then rotate by k*90 degrees with ``rot90_p``.

    Exactly six numbers are drawn from ``generator`` per call whatever happens, so the random stream does
    not depend on the outcomes. A rotation plane whose two sides differ in length is never chosen for a
    quarter turn (it would change the shape); such planes get a half turn instead.

    Args:
        image: (C, D, H, W) (or any tensor whose last three axes are spatial).
        lung_mask: same spatial shape as ``image``.
        generator: CPU ``torch.Generator``.
        flip_p: probability of flipping each of D, H, W. Defaults to 0.1.
        rot90_p: probability of a rotation. Defaults to 0.1.

    Returns:
        (image, lung_mask) transformed the same way (new tensors when anything was applied).
    """
    assert image.shape[-3:] == lung_mask.shape[-3:], (tuple(image.shape), tuple(lung_mask.shape))
    u = torch.rand(6, generator=generator).tolist()
    flip_dims = [axis for axis, draw in zip((-3, -2, -1), u[:3]) if draw < flip_p]
    if flip_dims:
        image, lung_mask = image.flip(flip_dims), lung_mask.flip(flip_dims)
    if u[3] < rot90_p:
        plane = _PLANES[min(int(u[4] * 3), 2)]
        k = 1 + min(int(u[5] * 3), 2)  # 1, 2 or 3 quarter turns
        if image.shape[plane[0]] != image.shape[plane[1]] and k != 2:
            k = 2
        image, lung_mask = image.rot90(k, plane), lung_mask.rot90(k, plane)
    return image, lung_mask


def random_flip_rot90_batch(
    images: torch.Tensor,
    lung_masks: torch.Tensor,
    generator: torch.Generator,
    flip_p: float = 0.1,
    rot90_p: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`random_flip_rot90` to each sample of a batch independently.

    Args:
        images: (B, C, D, H, W). lung_masks: (B, 1, D, H, W). generator, flip_p, rot90_p: as above.

    Returns:
        (images, lung_masks) of the same shapes.
    """
    if flip_p == 0 and rot90_p == 0:
        return images, lung_masks
    pairs = [random_flip_rot90(img, msk, generator, flip_p, rot90_p) for img, msk in zip(images, lung_masks)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
