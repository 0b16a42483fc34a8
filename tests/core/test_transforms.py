"""Joint flip/rot90 augmentation: image and lung mask stay aligned; probabilities and seeds are honoured."""

from __future__ import annotations

import pytest
import torch

from lungmae_core.errors import ConfigError
from lungmae_core.transforms import random_flip_rot90_batch


def random_flip_rot90(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, flip_p: float,
                      rot90_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample through the batch transform (training only ever augments batches)."""
    out_img, out_mask = random_flip_rot90_batch(image[None], mask[None], generator, flip_p, rot90_p)
    return out_img[0], out_mask[0]


def _pair(shape=(1, 6, 6, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    return image, (image > 0.5).to(torch.uint8)


@pytest.mark.parametrize("seed", range(8))
def test_image_and_mask_stay_aligned(seed: int) -> None:
    image, mask = _pair()
    out_img, out_mask = random_flip_rot90(image, mask, torch.Generator().manual_seed(seed), 0.5, 0.9)
    assert torch.equal((out_img > 0.5).to(torch.uint8), out_mask)
    assert torch.equal(out_img.flatten().sort().values, image.flatten().sort().values)  # same voxels, moved


def test_zero_probability_is_identity_and_one_flips_every_axis() -> None:
    image, mask = _pair()
    same = random_flip_rot90(image, mask, torch.Generator().manual_seed(0), 0.0, 0.0)
    assert torch.equal(same[0], image) and torch.equal(same[1], mask)
    flipped = random_flip_rot90(image, mask, torch.Generator().manual_seed(0), 1.0, 0.0)
    assert torch.equal(flipped[0], image.flip([-3, -2, -1]))


def test_rotation_happens_and_keeps_shape_of_non_cubes() -> None:
    image, mask = _pair((1, 4, 6, 6))
    changed = 0
    for seed in range(20):
        out, _ = random_flip_rot90(image, mask, torch.Generator().manual_seed(seed), 0.0, 1.0)
        assert out.shape == image.shape
        changed += not torch.equal(out, image)
    assert changed == 20


def test_batch_version_is_seeded_and_keeps_alignment() -> None:
    images = torch.rand(4, 1, 6, 6, 6)
    masks = (images > 0.5).float()
    a = random_flip_rot90_batch(images, masks, torch.Generator().manual_seed(1), 0.5, 0.5)
    b = random_flip_rot90_batch(images, masks, torch.Generator().manual_seed(1), 0.5, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal((a[0] > 0.5).float(), a[1])


def test_finetune_augmentation_keeps_head_and_foot_apart() -> None:
    """Fine-tuning's default augmentation never maps the apex onto the base (an apical disease onto a basal
    one is another diagnosis): it only mirrors left-right. Pretraining keeps the paper's every-axis flips."""
    from lungmae_core.config import TrainConfig

    fine, pre = TrainConfig.finetune_defaults(), TrainConfig.pretrain_defaults()
    assert (fine.flip_axes, fine.rot90_p) == ((2,), 0.0) and pre.flip_axes == (0, 1, 2)
    d = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1).expand(4, 1, 8, 8, 8).contiguous()
    image = d + 0.01 * torch.arange(8, dtype=torch.float32).view(1, 1, 1, 1, 8)  # head-foot ramp, left-right tilt
    mask = torch.ones(4, 1, 8, 8, 8)
    gen = torch.Generator().manual_seed(0)
    mirrored = 0
    for _ in range(20):
        out, out_mask = random_flip_rot90_batch(image, mask, gen, 1.0, fine.rot90_p, fine.flip_axes)
        assert torch.equal(out[:, :, :, 0, 0].round(), image[:, :, :, 0, 0].round())  # head-foot order kept
        mirrored += int(torch.equal(out, image.flip(-1)))
        assert torch.equal(out_mask, mask)
    assert mirrored == 20  # flip_p 1 on the only allowed axis: always the left-right mirror
    with pytest.raises(ConfigError, match="flip_axes"):
        TrainConfig(flip_axes=(0, 3))
