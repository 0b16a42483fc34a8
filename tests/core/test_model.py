"""3D MAE: patchify round trip, masking ratio and reproducibility, visible-only encoder, output shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lungmae_core.config import model_config
from lungmae_core.model import (
    MAE3D,
    LearnedPositionEmbedding,
    LearnedToken,
    build_mae,
    mae3d_vit_tiny_patch16,
    patchify3d,
    random_masking,
    unpatchify3d,
)


@pytest.mark.parametrize("shape, p, expected", [
    ((2, 1, 32, 32, 32), 16, (2, 8, 4096)),
    ((1, 1, 16, 32, 48), 8, (1, 2 * 4 * 6, 512)),
    ((3, 2, 8, 8, 8), 4, (3, 8, 128)),
])
def test_patchify_round_trip(shape: tuple, p: int, expected: tuple) -> None:
    imgs = torch.randn(shape)
    x = patchify3d(imgs, p)
    assert tuple(x.shape) == expected
    grid = (shape[2] // p, shape[3] // p, shape[4] // p)
    assert torch.equal(unpatchify3d(x, p, grid, channels=shape[1]), imgs)


def test_patchify_token_order_is_raster_over_d_h_w() -> None:
    imgs = torch.zeros(1, 1, 4, 4, 4)
    imgs[0, 0, 2:4, 0:2, 2:4] = 1.0  # patch (d=1, h=0, w=1) of a 2x2x2 grid
    x = patchify3d(imgs, 2)
    assert x[0].sum(dim=1).tolist() == [0, 0, 0, 0, 0, 8, 0, 0]  # index 1*4 + 0*2 + 1 = 5


@pytest.mark.parametrize("length, ratio, kept", [(64, 0.75, 16), (512, 0.75, 128), (8, 0.5, 4), (10, 0.75, 2)])
def test_random_masking_ratio(length: int, ratio: float, kept: int) -> None:
    x = torch.arange(3 * length, dtype=torch.float32).reshape(3, length, 1).repeat(1, 1, 4)
    x_kept, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(0))
    assert tuple(x_kept.shape) == (3, kept, 4)
    assert mask.dtype == torch.float32 and mask.sum(dim=1).tolist() == [length - kept] * 3
    for b in range(3):  # the kept tokens are exactly those with mask 0
        kept_ids = (x_kept[b, :, 0] - b * length).long().sort().values
        assert torch.equal(kept_ids, (mask[b] == 0).nonzero().flatten())
        assert sorted(ids_restore[b].tolist()) == list(range(length))
    assert not torch.equal(mask[0], mask[1])  # per-sample masks


def test_random_masking_is_reproducible_with_a_generator() -> None:
    x = torch.randn(2, 64, 8)
    a = random_masking(x, 0.75, torch.Generator().manual_seed(7))[1]
    b = random_masking(x, 0.75, torch.Generator().manual_seed(7))[1]
    c = random_masking(x, 0.75, torch.Generator().manual_seed(8))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("overrides, batch, tokens, patch_dim", [
    ({"img_size": 32}, 2, 8, 4096),
    ({"img_size": 32, "patch_size": 8}, 1, 64, 512),
    ({"img_size": 32, "mask_ratio": 0.5}, 3, 8, 4096),
])
def test_mae_forward_shapes(overrides: dict, batch: int, tokens: int, patch_dim: int) -> None:
    cfg = model_config("tiny", **overrides)
    mae = build_mae(cfg, seed=0)
    pred, mask = mae(torch.rand(batch, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    assert tuple(pred.shape) == (batch, tokens, patch_dim)
    assert mask.sum(dim=1).tolist() == [tokens - int(tokens * (1 - cfg.mask_ratio))] * batch
    assert tuple(mae.unpatchify(pred).shape) == (batch, 1, 32, 32, 32)


def test_encoder_sees_only_visible_tokens() -> None:
    mae = build_mae(model_config("tiny", img_size=32, patch_size=8), seed=0)  # 64 tokens, 16 visible
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    mae(torch.rand(2, 1, 32, 32, 32))
    assert seen == [(2, 16, 192)]


def test_build_mae_seed_and_factories() -> None:
    a, b = build_mae("tiny", seed=3), build_mae("tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.encoder.pos_embed.weight, build_mae("tiny", seed=4).encoder.pos_embed.weight)
    assert mae3d_vit_tiny_patch16(img_size=32).cfg.num_patches == 8


def test_no_batchnorm_and_no_bare_parameters() -> None:
    """Opacus needs per-sample-gradient-friendly layers: parameters live only in Linear, LayerNorm or the
    token/position modules, and there is no BatchNorm anywhere."""
    mae = build_mae(model_config("tiny", img_size=32), seed=0)
    allowed = (nn.Linear, nn.LayerNorm, LearnedToken, LearnedPositionEmbedding)
    for module in mae.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
        if list(module.parameters(recurse=False)):
            assert isinstance(module, allowed), type(module)
    assert isinstance(mae.decoder.mask_token, LearnedToken)
    assert isinstance(mae.encoder.pos_embed, LearnedPositionEmbedding)


def test_token_modules_give_one_copy_per_sample() -> None:
    token = LearnedToken(4)
    out = token(torch.zeros(3, 5, 4))
    assert tuple(out.shape) == (3, 1, 4)
    out.sum().backward()
    assert torch.equal(token.weight.grad, torch.full((1, 1, 4), 3.0))
    pos = LearnedPositionEmbedding(5, 4)
    x = torch.zeros(2, 5, 4)
    assert torch.equal(pos(x), pos.weight.expand(2, 5, 4))


def test_mae_is_an_mae3d_with_encoder_attribute() -> None:
    mae = build_mae("tiny")
    assert isinstance(mae, MAE3D) and mae.encoder.num_patches == 64


def test_patch_inputs_are_standardised_voxels_then_window_ramp_block_means() -> None:
    from lungmae_core.model import ViTEncoder3D

    enc = ViTEncoder3D(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, mlp_dim=8, input_mean=0.5,
                       input_std=0.25, input_windows=[(-1000.0, -900.0), (-900.0, -500.0)])
    hu = torch.full((1, 1, 8, 8, 8), -950.0)
    hu[..., :4, :, :] = -700.0                       # tokens of the first half in D: -700 HU, the rest -950 HU
    x = (hu + 1000.0) / 1200.0                       # the preprocessing window [-1000, 200] -> [0, 1]
    tokens = enc.patch_inputs(x)
    assert tokens.shape == (1, 8, 4 ** 3 + 2 * 2 ** 3)  # 64 voxels + 2 windows x (4/2)^3 block means
    first, last = tokens[0, 0], tokens[0, -1]
    std = lambda v: (v - 0.5) / 0.25  # noqa: E731
    torch.testing.assert_close(first[:64], std(torch.full((64,), 300.0 / 1200.0)))
    # -700 HU: above the emphysema window (ramp 1), half-way up -900..-500 (0.5); -950 HU: 0.5 and 0.
    # Block means are patchified like voxels: per block position, the windows in order (pd, ph, pw, C).
    torch.testing.assert_close(first[64:], std(torch.tensor([1.0, 0.5] * 8)))
    torch.testing.assert_close(last[64:], std(torch.tensor([0.5, 0.0] * 8)))


@pytest.mark.parametrize("overrides, message", [
    ({"input_windows": [[-500.0, -900.0]]}, "each window must be [low, high] HU with low < high; got [-500, -900]"),
    ({"input_windows": [-500.0]}, "'input-windows'[0] must be a list; got -500.0"),
    ({"input_std": 0.0}, "input_std must be a positive number; got 0.0"),
    ({"input_mean": float("nan")}, "input_mean must be a finite number"),
])
def test_bad_input_settings_are_named(overrides: dict, message: str) -> None:
    from lungmae_core.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        model_config("tiny", **overrides)


def test_input_windows_built_in_code_are_checked_too() -> None:
    from lungmae_core.config import ModelConfig
    from lungmae_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"input_windows must be a list of \[low, high\] HU pairs; got \[-500.0\]"):
        ModelConfig(input_windows=[-500.0])  # type: ignore[list-item]
    assert ModelConfig(input_windows=[[-1000, -900]]).input_windows == ((-1000.0, -900.0),)


def test_mask_from_ids_restore_equals_the_gathered_mask() -> None:
    """The mask computed from ids_restore is MAE's shuffled-ones-then-gather mask, value for value."""
    from lungmae_core.model import random_masking

    x = torch.randn(3, 50, 4)
    for ratio in (0.0, 0.5, 0.75, 0.98):
        _, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(7))
        keep = int(50 * (1 - ratio))
        reference = torch.ones(3, 50)
        reference[:, :keep] = 0
        assert torch.equal(mask, torch.gather(reference, 1, ids_restore))
