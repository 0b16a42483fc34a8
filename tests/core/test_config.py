"""Model and training configs: named architectures, parameter counts, YAML overrides, error messages."""

from __future__ import annotations

import math

import pytest
import torch

from lungmae_core.config import MODEL_CONFIGS, ModelConfig, TrainConfig, model_config, to_mapping
from lungmae_core.errors import ConfigError
from lungmae_core.model import MAE3D, WINDOW_BLOCK


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_p16_parameter_counts() -> None:
    """The paper (docs/model.md): ~88.6M encoder + ~28.0M decoder parameters (~116M, ~465 MB in fp32)."""
    with torch.device("meta"):  # no memory, no init cost
        mae = MAE3D(model_config("paper-p16"))
    assert _count(mae.encoder) / 1e6 == pytest.approx(88.6, rel=0.002)
    assert _count(mae.decoder) / 1e6 == pytest.approx(28.0, rel=0.002)
    assert _count(mae) * 4 / 1e6 == pytest.approx(465, rel=0.01)


def _blocks(dim: int, depth: int, mlp: int) -> int:
    """Parameters of ``depth`` pre-norm blocks: 2 LayerNorms, fused QKV + proj, two-layer MLP."""
    return depth * (2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim))


@pytest.mark.parametrize("name", ["tiny", "paper-p16", "paper-p8", "paper-256"])
def test_parameter_counts_match_the_architecture(name: str) -> None:
    cfg = model_config(name)
    e, d, n, p = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches, cfg.patch_dim
    block = math.gcd(cfg.patch_size, WINDOW_BLOCK)  # window ramps enter as block means
    embed_in = p + (cfg.patch_size // block) ** 3 * cfg.in_chans * len(cfg.input_windows)
    encoder = embed_in * e + e + n * e + _blocks(e, cfg.depth, cfg.mlp_dim) + 2 * e
    decoder = e * d + d + d + n * d + _blocks(d, cfg.decoder_depth, cfg.decoder_mlp_dim) + 2 * d + d * p + p
    with torch.device("meta"):
        mae = MAE3D(cfg)
    assert (_count(mae.encoder), _count(mae.decoder)) == (encoder, decoder)


@pytest.mark.parametrize("name, tokens, patch_dim", [
    ("tiny", 64, 4096), ("paper-p16", 512, 4096), ("paper-p8", 4096, 512), ("paper-256", 512, 32768)])
def test_named_configs_geometry(name: str, tokens: int, patch_dim: int) -> None:
    cfg = model_config(name)
    assert (cfg.name, cfg.num_patches, cfg.patch_dim, cfg.mask_ratio) == (name, tokens, patch_dim, 0.75)
    assert MODEL_CONFIGS[name] == cfg


def test_tiny_matches_brief() -> None:
    cfg = model_config("tiny")
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (
        64, 16, 192, 4, 3, 768)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (128, 2, 4)


def test_overrides_kebab_and_snake() -> None:
    cfg = model_config("tiny", img_size=32, **{"mask-ratio": 0.5})
    assert (cfg.img_size, cfg.mask_ratio, cfg.num_patches) == (32, 0.5, 8)


def test_yaml_with_base_and_round_trip(tmp_path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("base: paper-p16\ndepth: 6\nimg-size: 64\n")
    cfg = model_config(path)
    assert (cfg.depth, cfg.img_size, cfg.embed_dim, cfg.name) == (6, 64, 768, "paper-p16+small")
    assert model_config(cfg) == cfg
    assert ModelConfig(**{k.replace("-", "_"): v for k, v in to_mapping(cfg).items()}) == cfg


@pytest.mark.parametrize("args, overrides, message", [
    ("tiny", {"img_size": 100}, "img_size 100 must be divisible by patch_size 16 on every axis; the remainder is 4"),
    ("tiny", {"embed_dim": 100}, "embed_dim 100 must be divisible by num_heads 3"),
    ("tiny", {"decoder_num_heads": 3}, "decoder_embed_dim 128 must be divisible by decoder_num_heads 3"),
    ("tiny", {"mask_ratio": 1.0}, "mask_ratio must be in the open range (0, 1); got 1.0"),
    ("tiny", {"depth": 0}, "depth must be a positive integer; got 0"),
    ("tiny", {"depth": 2.5}, "'depth' must be an integer; got 2.5"),
    ("tiny", {"widht": 3}, "'widht' is not a known key; allowed keys: decoder-depth"),
    ("huge", {}, "Unknown model config 'huge'; use one of tiny, paper-p16, paper-p8, paper-256 or a path"),
])
def test_model_config_errors(args: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        model_config(args, **overrides)
    assert message in str(info.value)


def test_yaml_errors_name_file_and_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base: paper-p99\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'base' must be one of tiny, paper-p16"):
        model_config(path)
    path.write_text("patch-size: 7\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: img_size 64 must be divisible by patch_size 7"):
        model_config(path)


def test_train_defaults_follow_paper() -> None:
    pre, fine = TrainConfig.pretrain_defaults(), TrainConfig.finetune_defaults()
    assert (pre.lr, pre.weight_decay, pre.batch_size, pre.warmup_frac) == (3e-4, 0.05, 8, 0.1)
    assert (fine.lr, fine.weight_decay, fine.batch_size, fine.warmup_frac) == (1e-5, 1e-3, 4, 0.1)
    assert (pre.non_lung_weight, pre.lung_threshold, pre.flip_p, pre.rot90_p) == (0.01, 0.25, 0.1, 0.1)
    assert TrainConfig.finetune_defaults(**{"finetune-mode": "linear-probe"}).finetune_mode == "linear-probe"
    assert TrainConfig.finetune_defaults(**{"finetune-mode": "last-2"}).finetune_mode == "last-2"


@pytest.mark.parametrize("overrides, message", [
    ({"lr": 0}, "lr must be positive; got 0"),
    ({"warmup_frac": 1.0}, "warmup_frac must be in [0, 1); got 1.0"),
    ({"max_steps": 0}, "max_steps must be >= 1 or null; got 0"),
    ({"flip_p": 1.5}, "flip_p must be a probability in [0, 1]; got 1.5"),
    ({"amp": "fp8"}, "'amp' must be one of 'bf16', 'fp16', 'none'; got 'fp8'"),
    ({"finetune_mode": "probe"},
     "finetune_mode must be 'full', 'linear-probe' or 'last-K' (K in 1..99); got 'probe'"),
    ({"finetune_mode": "last-0"},
     "finetune_mode must be 'full', 'linear-probe' or 'last-K' (K in 1..99); got 'last-0'"),
    ({"batch_size": "8"}, "'batch_size' must be an integer; got '8'"),
])
def test_train_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.pretrain_defaults(**overrides)
    assert message in str(info.value)
