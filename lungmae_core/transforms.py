"""Augmentation of the paper, applied to a CT image and its lung mask together so they stay aligned.

Random flip of each spatial axis (p = 0.1 each) and one random 90-degree rotation (p = 0.1) in a random
plane, as the paper describes ("Unmasking Interstitial Lung Diseases: Leveraging Masked Autoencoders for
Diagnosis", arXiv 2508.04429). Built from MONAI's dictionary transforms (``OneOf`` choices of ``Flipd`` and
``Rotate90d``), which apply one random draw to every key of a sample, so image and mask cannot drift apart.
Randomness comes from the caller's ``torch.Generator``: one seed is drawn from it per call and handed to
MONAI's random state, so any step can be replayed. benchmarks/transforms.py times this against the
plain-torch version it replaced.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # MONAI is imported when the first transform is built
    from monai.transforms import Compose, MapTransform

__all__ = ["flip_rot90_transform", "random_flip_rot90_batch"]

_KEYS = ("image", "lung_mask")
# Planes of a rotation as pairs of spatial axes (MONAI counts spatial axes after the channel): (D, H), (D, W), (H, W).
_PLANES = ((0, 1), (0, 2), (1, 2))


def flip_rot90_transform(spatial_shape: tuple[int, int, int], flip_p: float = 0.1, rot90_p: float = 0.1,
                         flip_axes: tuple[int, ...] = (0, 1, 2)) -> Compose:
    """The MONAI transform: flip each axis with ``flip_p``, then, with ``rot90_p``, turn in one random plane.

    Written as two ``OneOf`` choices of deterministic MONAI transforms, weighted to give exactly that
    distribution: one of the 8 flip combinations (axes flipped independently, so a set S of axes has weight
    ``flip_p^|S| (1 - flip_p)^(3 - |S|)``), then no turn (``1 - rot90_p``) or one of 3 planes x 3 quarter-turn
    counts (``rot90_p / 9`` each). Chained ``RandFlipd`` per axis would copy the volume once per flipped axis;
    this copies it at most once per step. A plane whose two sides differ in length cannot take a quarter turn
    without changing the shape; it gets a half turn instead, so every output has the input's shape.

    Args:
        spatial_shape: (D, H, W) of the samples it will see.
        flip_p: probability of flipping each of D, H, W. Defaults to 0.1.
        rot90_p: probability of a rotation. Defaults to 0.1.
        flip_axes: the spatial axes a flip may act on (0 head-foot, 1 front-back, 2 left-right of the
            canonical cube); the others are never flipped. Defaults to all three (the paper's).

    Returns:
        A ``monai.transforms.Compose`` over the keys ``image`` and ``lung_mask`` (channel-first tensors).
    """
    from itertools import combinations

    from monai.transforms import Compose, Flipd, Identityd, OneOf, Rotate90d

    flips: list[MapTransform] = []
    flip_weights: list[float] = []
    allowed = sorted(set(flip_axes))
    for n_axes in range(len(allowed) + 1):
        for axes in combinations(allowed, n_axes):
            flips.append(Flipd(_KEYS, spatial_axis=list(axes)) if axes else Identityd(_KEYS))
            flip_weights.append(flip_p ** n_axes * (1.0 - flip_p) ** (len(allowed) - n_axes))
    turns: list[MapTransform] = [Identityd(_KEYS)]
    turn_weights = [1.0 - rot90_p]
    for plane in _PLANES:
        square = spatial_shape[plane[0]] == spatial_shape[plane[1]]
        for k in (1, 2, 3):
            turns.append(Rotate90d(_KEYS, k=k if square else 2, spatial_axes=plane))
            turn_weights.append(rot90_p / 9.0)
    return Compose([OneOf(flips, weights=flip_weights), OneOf(turns, weights=turn_weights)])


_local = threading.local()  # one cached transform set per thread: set_random_state mutates it


@functools.cache
def _no_meta() -> tuple[Callable[[], bool], Callable[[bool], Any]]:
    """MONAI's switch for MetaTensor tracking: off during our calls (it doubles the cost of a flip)."""
    from monai.data import get_track_meta, set_track_meta

    return get_track_meta, set_track_meta


def _cached_transform(spatial_shape: tuple[int, int, int], flip_p: float, rot90_p: float,
                      flip_axes: tuple[int, ...] = (0, 1, 2)) -> Compose:
    """Building the Compose costs about as much as applying it; keep one per shape and probabilities."""
    cache: dict[tuple[tuple[int, int, int], float, float, tuple[int, ...]], Compose] | None = getattr(
        _local, "transforms", None)
    if cache is None:
        cache = _local.transforms = {}
    key = (spatial_shape, flip_p, rot90_p, tuple(flip_axes))
    if key not in cache:
        cache[key] = flip_rot90_transform(spatial_shape, flip_p, rot90_p, tuple(flip_axes))
    return cache[key]


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def _plain(x: torch.Tensor) -> torch.Tensor:
    """MONAI returns MetaTensors; the training loop wants plain tensors (no metadata travels with a batch)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def random_flip_rot90_batch(
    images: torch.Tensor,
    lung_masks: torch.Tensor,
    generator: torch.Generator,
    flip_p: float = 0.1,
    rot90_p: float = 0.1,
    flip_axes: tuple[int, ...] = (0, 1, 2),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip and rotate each sample of a batch independently, image and mask alike.

    Exactly one number is drawn from ``generator`` per call (the seed of MONAI's random state), so the
    stream does not depend on the outcomes or the batch size.

    Args:
        images: (B, C, D, H, W). lung_masks: (B, 1, D, H, W), same spatial shape.
        generator: CPU ``torch.Generator``.
        flip_p: probability of flipping each of D, H, W. Defaults to 0.1.
        rot90_p: probability of a rotation. Defaults to 0.1.
        flip_axes: the axes a flip may act on (see :func:`flip_rot90_transform`). Defaults to all three.

    Returns:
        (images, lung_masks) of the same shapes.
    """
    assert images.shape[-3:] == lung_masks.shape[-3:], (tuple(images.shape), tuple(lung_masks.shape))
    assert images.ndim == 5 and lung_masks.ndim == 5, (tuple(images.shape), tuple(lung_masks.shape))
    if (flip_p == 0 or not flip_axes) and rot90_p == 0:
        return images, lung_masks
    d, h, w = (int(n) for n in images.shape[-3:])
    transform = _cached_transform((d, h, w), float(flip_p), float(rot90_p), tuple(int(a) for a in flip_axes))
    transform.set_random_state(seed=_seed(generator))
    get_track_meta, set_track_meta = _no_meta()
    tracking = get_track_meta()
    set_track_meta(False)  # plain tensors in, plain tensors out; no per-sample transform history
    try:
        outs = [transform({"image": img, "lung_mask": msk}) for img, msk in zip(images, lung_masks, strict=True)]
    finally:
        set_track_meta(tracking)
    return (torch.stack([_plain(o["image"]) for o in outs]),
            torch.stack([_plain(o["lung_mask"]) for o in outs]))
