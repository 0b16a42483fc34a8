"""The architecture of the 3D MAE and of the classifier on its encoder: :class:`ModelConfig`, the named
configs (``tiny`` and the paper's three) and :func:`model_config`, which picks one by name or YAML file."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Literal

from lungmae_core.config.loader import check, from_mapping, load_yaml, norm_key, to_mapping
from lungmae_core.errors import ConfigError

__all__ = ["INPUT_HU_MAX", "INPUT_HU_MIN", "MODEL_CONFIGS", "TINY_INPUT_WINDOWS", "ModelConfig", "model_config"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the 3D MAE (and of the classifier built on its encoder); plain values only.

    Volumes are cubes: ``img_size`` voxels per side, cut into ``(img_size // patch_size) ** 3`` cubic patches
    of ``patch_size ** 3 * in_chans`` voxels each (the token count ``L`` and the patch length ``P``).

    Args:
        name: the config's name, carried into checkpoints. Defaults to ``"custom"``.
        img_size: side of the input cube in voxels (e.g. 128 for ``(1, 128, 128, 128)``).
        patch_size: side of a cubic patch in voxels; must divide ``img_size``.
        in_chans: channels of the input. Defaults to 1 (CT).
        embed_dim, depth, num_heads, mlp_dim: encoder width, blocks, attention heads, MLP hidden width.
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_dim: the same for the MAE decoder.
        mask_ratio: fraction of patches hidden from the encoder during pretraining, in (0, 1). Defaults to 0.75.
        input_mean, input_std: the encoder standardises its input, ``(x - input_mean) / input_std``, before the
            patch embedding (the cubes and the MAE's reconstruction targets stay in [0, 1]). Chest cubes in
            [0, 1] average about 0.6, so without centring every token shares one large component that the
            LayerNorms then scale away: the tiny ViT could not fit 72 labelled phantoms from scratch (training
            accuracy 0.29 after 40 epochs) and fits them all with it. Defaults 0.55 and 0.35 (chest cubes).
        input_windows: extra input channels for the encoder, one per HU window ``(lo, hi)``: each voxel's
            ``clamp((HU - lo) / (hi - lo), 0, 1)``, with HU read back from the [0, 1] cube through the
            preprocessing window ``[INPUT_HU_MIN, INPUT_HU_MAX]`` (docs/model.md: -1000..200). A linear patch
            embedding only sees linear projections of a patch's voxels; these ramps let it measure how much of
            a patch lies in each density range (emphysema below -900 HU, aerated lung, ground glass, soft
            tissue), a soft histogram per patch (read as 2^3-voxel block means: ``model.WINDOW_BLOCK``).
            Voxelwise, so the MAE's masking hides just as much. Empty (the
            paper's single channel) for the paper configs; ``tiny`` uses four (see docs/model.md for the
            measured effect).
        stem: how a patch becomes a token. ``"linear"`` (the paper): one linear layer over the patch's voxels
            (and window ramps). ``"conv"``: a small strided convolutional stem
            (:class:`lungmae_core.stem.ConvStem3D`) whose kernels never cross a patch boundary, so masking
            hides exactly as much as with the linear embedding while the token keeps local HU texture
            (edges, walls, cysts) that a single linear projection of a 16^3 patch averages away.

    Raises:
        ConfigError: naming the field and the value, e.g. "img_size 100 must be divisible by patch_size 16 on
            every axis; the remainder is 4".

    Examples:
        >>> model_config("paper-p16").num_patches, model_config("paper-p16").patch_dim
        (512, 4096)
    """

    name: str = "custom"
    img_size: int = 64
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_dim: int = 768
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    decoder_mlp_dim: int = 512
    mask_ratio: float = 0.75
    input_mean: float = 0.55
    input_std: float = 0.35
    input_windows: tuple[tuple[float, float], ...] = ()
    stem: Literal["linear", "conv"] = "linear"

    def __post_init__(self) -> None:
        try:
            windows = tuple((float(lo), float(hi)) for lo, hi in self.input_windows)
        except (TypeError, ValueError):
            raise ConfigError(f"input_windows must be a list of [low, high] HU pairs; got {self.input_windows!r}") \
                from None
        for lo, hi in windows:
            check(math.isfinite(lo) and math.isfinite(hi) and lo < hi,
                  f"input_windows: each window must be [low, high] HU with low < high; got [{lo:g}, {hi:g}]")
        object.__setattr__(self, "input_windows", windows)
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim",
                    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                  f"{key} must be a positive integer; got {value!r}")
        check(self.img_size % self.patch_size == 0,
              f"img_size {self.img_size} must be divisible by patch_size {self.patch_size} on every axis; "
              f"the remainder is {self.img_size % self.patch_size}")
        check(self.embed_dim % self.num_heads == 0,
              f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}; "
              f"the remainder is {self.embed_dim % self.num_heads}")
        check(self.decoder_embed_dim % self.decoder_num_heads == 0,
              f"decoder_embed_dim {self.decoder_embed_dim} must be divisible by decoder_num_heads "
              f"{self.decoder_num_heads}; the remainder is {self.decoder_embed_dim % self.decoder_num_heads}")
        check(isinstance(self.mask_ratio, (int, float)) and 0.0 < self.mask_ratio < 1.0,
              f"mask_ratio must be in the open range (0, 1); got {self.mask_ratio!r}")
        check(isinstance(self.input_mean, (int, float)) and math.isfinite(self.input_mean),
              f"input_mean must be a finite number; got {self.input_mean!r}")
        check(isinstance(self.input_std, (int, float)) and math.isfinite(self.input_std) and self.input_std > 0,
              f"input_std must be a positive number; got {self.input_std!r}")
        check(self.stem in ("linear", "conv"), f"stem must be 'linear' or 'conv'; got {self.stem!r}")
        check(self.num_patches - int(self.num_patches * self.mask_ratio) >= 1,
              f"mask_ratio {self.mask_ratio} leaves no visible patch out of {self.num_patches}")

    @property
    def grid_size(self) -> int:
        """Patches per axis: ``img_size // patch_size``."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Token count ``L`` of a whole volume: ``grid_size ** 3``."""
        return self.grid_size ** 3

    @property
    def embed_channels(self) -> int:
        """Channels the patch embedding reads per voxel: ``in_chans`` times (1 + one per input window)."""
        return self.in_chans * (1 + len(self.input_windows))

    @property
    def patch_dim(self) -> int:
        """Voxels per patch ``P = patch_size ** 3 * in_chans`` (the decoder's output width)."""
        return self.patch_size ** 3 * self.in_chans


#: HU window of the cubes the encoder reads (docs/model.md, preprocessing step 6: [-1000, 200] -> [0, 1]).
INPUT_HU_MIN, INPUT_HU_MAX = -1000.0, 200.0

#: The ``tiny`` config's density ranges (HU): emphysema, aerated lung, ground glass, dense lung / soft tissue.
TINY_INPUT_WINDOWS: tuple[tuple[float, float], ...] = ((-1000.0, -900.0), (-900.0, -750.0), (-750.0, -500.0),
                                                       (-500.0, 0.0))

_PAPER_P16 = ModelConfig(name="paper-p16", img_size=128, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                         mlp_dim=3072, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=8,
                         decoder_mlp_dim=2048, mask_ratio=0.75)

#: Named architectures: ``tiny`` for CPU tests and simulation; the paper's three (docs/model.md).
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3,
                        mlp_dim=768, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                        decoder_mlp_dim=512, mask_ratio=0.75, input_windows=TINY_INPUT_WINDOWS),
    "paper-p16": _PAPER_P16,
    "paper-p8": dataclasses.replace(_PAPER_P16, name="paper-p8", patch_size=8),
    "paper-256": dataclasses.replace(_PAPER_P16, name="paper-256", img_size=256, patch_size=32),
}


def model_config(name_or_path: str | os.PathLike[str] | ModelConfig = "tiny", **overrides: Any) -> ModelConfig:
    """Return a model config by name (``MODEL_CONFIGS``) or from a YAML file, with keyword overrides.

    A YAML file may start from a named config with ``base: paper-p16`` and override any field; without
    ``base`` it starts from the field defaults (``tiny``-sized). Overrides may use kebab- or snake_case.

    Args:
        name_or_path: a name in ``MODEL_CONFIGS``, a path to a ``.yaml``/``.yml`` file, or a ``ModelConfig``.
        overrides: field values that replace the chosen config's, e.g. ``img_size=32``.

    Raises:
        ConfigError: for an unknown name (listing the known ones), an unknown key or a bad value.

    Examples:
        >>> model_config("tiny", img_size=32).num_patches
        8
    """
    if isinstance(name_or_path, ModelConfig):
        base, source = to_mapping(name_or_path), f"model config {name_or_path.name!r}"
    elif str(name_or_path) in MODEL_CONFIGS:
        base, source = to_mapping(MODEL_CONFIGS[str(name_or_path)]), f"model config {str(name_or_path)!r}"
    elif str(name_or_path).endswith((".yaml", ".yml")):
        data = load_yaml(name_or_path)
        source = str(name_or_path)
        base_name = data.pop("base", None)
        if base_name is not None and str(base_name) not in MODEL_CONFIGS:
            raise ConfigError(f"{source}: 'base' must be one of {', '.join(MODEL_CONFIGS)}; got {base_name!r}")
        base = to_mapping(MODEL_CONFIGS[str(base_name)]) if base_name is not None else {}
        if base_name is not None:
            base["name"] = f"{base_name}+{Path(source).stem}"
        base.update({norm_key(k).replace("_", "-"): v for k, v in data.items()})
        if "name" not in data and base_name is None:
            base["name"] = Path(source).stem
    else:
        raise ConfigError(f"Unknown model config {str(name_or_path)!r}; use one of "
                          f"{', '.join(MODEL_CONFIGS)} or a path to a .yaml file")
    base.update({norm_key(k).replace("_", "-"): v for k, v in overrides.items()})
    return from_mapping(ModelConfig, base, source=source)
