"""Typed, validated configuration: frozen dataclasses built from YAML or flat kebab-case mappings.

Every configuration in LungMAE-FL (model, preprocessing, training, ``site.yaml``, ``federation.yaml``) is
a frozen dataclass of plain values that checks itself in ``__post_init__``. This module turns a mapping
(from YAML, from Flower's ``run_config`` or from the command line) into such a dataclass and makes every
error name the file, the key and what was allowed, as nanoGPT's configurator rejects unknown keys.

Examples:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Demo:
    ...     lr: float = 3e-4
    ...     mask_ratio: float = 0.75
    >>> from_mapping(Demo, {"mask-ratio": 0.5}, source="demo.yaml")
    Demo(lr=0.0003, mask_ratio=0.5)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lungmae_core.errors import ConfigError

__all__ = ["from_mapping", "load_yaml", "to_mapping", "check", "T"]

T = TypeVar("T")


def _norm_key(key: str) -> str:
    return str(key).replace("-", "_")


def _where(source: str, key: str) -> str:
    return f"{source}: '{key}'" if key else source


def check(condition: bool, message: str, error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``condition``; the helper ``__post_init__`` methods use."""
    if not condition:
        raise error(message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, error: type[ConfigError]) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ``error`` naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise error(f"{where} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, error)
            except ConfigError as exc:
                last = exc
        raise error(f"{where} must be {_type_name(tp)}; got {value!r}") from last
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise error(f"{where} must be a mapping of keys to values; got {value!r}")
        return from_mapping(tp, value, source=where, error=error)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise error(f"{where} must be a list; got {value!r}")
        args = get_args(tp)
        homogeneous = origin is list or not args or args[-1] is Ellipsis
        if not homogeneous and len(args) != len(value):
            raise error(f"{where} must have {len(args)} items; got {len(value)}: {value!r}")
        item_types = [args[0] if args else Any] * len(value) if homogeneous else list(args)
        items = [_coerce(v, t, f"{where}[{i}]", error) for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise error(f"{where} must be a mapping; got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{where} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise error(f"{where} must be an integer; got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "1e-5" as a string
                except ValueError:
                    pass
            raise error(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{where} must be a string; got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise error(f"{where} must be a path (string); got {value!r}")
        return Path(os.path.expanduser(os.fspath(value)))
    return value


def from_mapping(
    cls: type[T],
    mapping: Mapping[str, Any] | None,
    *,
    source: str = "config",
    error: type[ConfigError] = ConfigError,
) -> T:
    """Build the frozen dataclass ``cls`` from ``mapping``, rejecting unknown keys and bad types.

    Keys may be kebab-case (``mask-ratio``, as in Flower's run config and our YAML) or snake_case.
    Missing keys take the dataclass defaults; a field without a default is required.

    Args:
        cls: a dataclass type whose fields are annotated with plain types (int, float, bool, str, Path,
            Literal, Optional, tuple/list of those, or nested dataclasses).
        mapping: the values; ``None`` means all defaults.
        source: where the values came from, quoted in every error (e.g. ``"site.yaml: 'privacy'"``).
        error: the ``ConfigError`` subclass to raise.

    Raises:
        ConfigError: naming ``source``, the key and the allowed keys or values.
    """
    assert dataclasses.is_dataclass(cls), cls
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise error(f"{source} must be a mapping of keys to values; got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = _norm_key(raw_key)
        if key not in fields:
            allowed = ", ".join(sorted(k.replace("_", "-") for k in fields))
            raise error(f"{_where(source, str(raw_key))} is not a known key; allowed keys: {allowed}")
        values[key] = _coerce(value, hints[key], _where(source, str(raw_key)), error)
    for name, field in fields.items():
        if name not in values and field.default is dataclasses.MISSING \
                and field.default_factory is dataclasses.MISSING:
            raise error(f"{_where(source, name.replace('_', '-'))} is required but missing")
    try:
        return cls(**values)
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise error(f"{source}: {exc}") from exc


def to_mapping(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_mapping`: a JSON/YAML-ready dict with kebab-case keys."""
    assert dataclasses.is_dataclass(obj), obj
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_mapping(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[f.name.replace("_", "-")] = value
    return out


def load_yaml(path: str | os.PathLike[str], error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"Unable to read {path} as it does not exist") from None
    except OSError as exc:
        raise error(f"Unable to read {path} as {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"Unable to parse {path}{at} as it is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping of keys to values at the top level; got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------
# Model and training configurations (the model area). Everything above is the generic loader.
# ----------------------------------------------------------------------------------------------------------

__all__ += ["ModelConfig", "MODEL_CONFIGS", "model_config", "TrainConfig"]


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
            raise ConfigError(f"input_windows must be a list of [low, high] HU pairs; got {self.input_windows!r}")
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

_PAPER = dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, decoder_embed_dim=512, decoder_depth=8,
              decoder_num_heads=8, decoder_mlp_dim=2048, mask_ratio=0.75)

#: Named architectures: ``tiny`` for CPU tests and simulation; the paper's three (docs/model.md).
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3,
                        mlp_dim=768, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                        decoder_mlp_dim=512, mask_ratio=0.75, input_windows=TINY_INPUT_WINDOWS),
    "paper-p16": ModelConfig(name="paper-p16", img_size=128, patch_size=16, **_PAPER),
    "paper-p8": ModelConfig(name="paper-p8", img_size=128, patch_size=8, **_PAPER),
    "paper-256": ModelConfig(name="paper-256", img_size=256, patch_size=32, **_PAPER),
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
        base.update({_norm_key(k).replace("_", "-"): v for k, v in data.items()})
        if "name" not in data and base_name is None:
            base["name"] = Path(source).stem
    else:
        raise ConfigError(f"Unknown model config {str(name_or_path)!r}; use one of "
                          f"{', '.join(MODEL_CONFIGS)} or a path to a .yaml file")
    base.update({_norm_key(k).replace("_", "-"): v for k, v in overrides.items()})
    return from_mapping(ModelConfig, base, source=source)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one local training phase (MAE pretraining or classifier fine-tuning).

    The paper's settings are :meth:`pretrain_defaults` (AdamW lr 3e-4, wd 0.05, batch 8) and
    :meth:`finetune_defaults` (lr 1e-5, wd 1e-3, batch 4); both use 10% linear warmup then cosine decay.

    Args:
        lr: peak learning rate of AdamW. Defaults to 3e-4.
        weight_decay: AdamW decoupled weight decay. Defaults to 0.05.
        warmup_frac: fraction of the steps spent in linear warmup, in [0, 1). Defaults to 0.1.
        epochs: passes over the local dataset. Defaults to 1.
        max_steps: train exactly this many steps instead of ``epochs`` passes (cycling over the data as
            needed); ``None``: use ``epochs``.
        batch_size: volumes per step. Defaults to 8.
        grad_clip: clip the global gradient norm to this value; ``None``: no clipping (ignored under DP,
            where Opacus clips per sample).
        amp: autocast dtype on CUDA: ``"bf16"``, ``"fp16"`` (with a GradScaler) or ``"none"``. CPU runs fp32.
        non_lung_weight: ``w`` of the lung-weighted loss (docs/model.md). Defaults to 0.01.
        lung_threshold: a masked patch is "lung" when more than this fraction of its voxels is lung.
        flip_p: probability of flipping each axis of ``flip_axes`` (image and lung mask together). Defaults
            to 0.1.
        rot90_p: probability of one random 90-degree rotation. Defaults to 0.1 (0 in :meth:`finetune_defaults`).
        flip_axes: the canonical cube's axes a flip may act on: 0 head-foot, 1 front-back, 2 left-right.
            Defaults to all three (the paper's, for pretraining); :meth:`finetune_defaults` keeps only the
            left-right mirror, because a head-foot flip or a turn through the head-foot axis swaps apical and
            basal disease, i.e. changes the label.
        finetune_mode: ``"full"``, ``"linear-probe"`` (only head, norm and CLS token train) or ``"last-K"``
            (those plus the encoder's last K blocks; ``lungmae_core.heads.set_trainable``).
        pooling: classifier pooling: ``"lung"`` (tokens weighted by their lung fraction), ``"mean"`` over
            tokens or a learned ``"cls"`` token (see :class:`~lungmae_core.heads.ILDClassifier`).
        label_smoothing: cross-entropy label smoothing in [0, 1). Defaults to 0.
        mixup_alpha: Beta(alpha, alpha) mixup of volumes and labels; 0 disables it.
        num_workers: DataLoader worker processes. Defaults to 0.
        layer_decay: layer-wise learning-rate decay for fine-tuning (MAE's recipe, 0.65-0.75): encoder block
            ``i`` of ``depth`` trains at ``lr * layer_decay ** (depth - i)``, the patch embedding at
            ``layer_decay ** (depth + 1)``, head and norms at ``lr``; pretrained lower layers move less than
            the new head. 1.0 (default): one learning rate for all.

    Raises:
        ConfigError: naming the field and the value.
    """

    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_clip: float | None = None
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    non_lung_weight: float = 0.01
    lung_threshold: float = 0.25
    flip_p: float = 0.1
    rot90_p: float = 0.1
    flip_axes: tuple[int, ...] = (0, 1, 2)
    finetune_mode: str = "full"
    pooling: Literal["lung", "mean", "cls"] = "lung"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    num_workers: int = 0
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, f"lr must be positive; got {self.lr!r}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay!r}")
        check(0.0 <= self.warmup_frac < 1.0, f"warmup_frac must be in [0, 1); got {self.warmup_frac!r}")
        check(self.epochs >= 1, f"epochs must be >= 1; got {self.epochs!r}")
        check(self.max_steps is None or self.max_steps >= 1,
              f"max_steps must be >= 1 or null; got {self.max_steps!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size!r}")
        check(self.grad_clip is None or self.grad_clip > 0,
              f"grad_clip must be positive or null; got {self.grad_clip!r}")
        check(self.amp in ("bf16", "fp16", "none"), f"amp must be one of 'bf16', 'fp16', 'none'; got {self.amp!r}")
        check(self.non_lung_weight >= 0, f"non_lung_weight must be >= 0; got {self.non_lung_weight!r}")
        check(0.0 <= self.lung_threshold < 1.0, f"lung_threshold must be in [0, 1); got {self.lung_threshold!r}")
        for key in ("flip_p", "rot90_p"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, f"{key} must be a probability in [0, 1]; got {value!r}")
        check(all(a in (0, 1, 2) for a in self.flip_axes) and len(set(self.flip_axes)) == len(self.flip_axes),
              f"flip_axes must list distinct axes among 0 (head-foot), 1 (front-back), 2 (left-right); got "
              f"{list(self.flip_axes)!r}")
        check(self.finetune_mode in ("full", "linear-probe")
              or bool(re.fullmatch(r"last-[1-9][0-9]?", str(self.finetune_mode))),
              f"finetune_mode must be 'full', 'linear-probe' or 'last-K' (K in 1..99); got {self.finetune_mode!r}")
        check(self.pooling in ("lung", "mean", "cls"),
              f"pooling must be one of 'lung', 'mean', 'cls'; got {self.pooling!r}")
        check(0.0 <= self.label_smoothing < 1.0,
              f"label_smoothing must be in [0, 1); got {self.label_smoothing!r}")
        check(self.mixup_alpha >= 0, f"mixup_alpha must be >= 0; got {self.mixup_alpha!r}")
        check(self.num_workers >= 0, f"num_workers must be >= 0; got {self.num_workers!r}")
        check(0.0 < self.layer_decay <= 1.0, f"layer_decay must be in (0, 1]; got {self.layer_decay!r}")

    @classmethod
    def pretrain_defaults(cls, **overrides: Any) -> TrainConfig:
        """The paper's MAE pretraining: AdamW lr 3e-4, weight decay 0.05, batch 8, 10% warmup + cosine."""
        values: dict[str, Any] = dict(lr=3e-4, weight_decay=0.05, batch_size=8, warmup_frac=0.1)
        values.update({_norm_key(k): v for k, v in overrides.items()})
        return from_mapping(cls, values, source="pretrain config")

    @classmethod
    def finetune_defaults(cls, **overrides: Any) -> TrainConfig:
        """The paper's fine-tuning (AdamW lr 1e-5, weight decay 1e-3, batch 4, 10% warmup + cosine) with
        label-preserving augmentation: the left-right mirror only (``flip_axes`` (2,), ``rot90_p`` 0).

        The paper flips and turns every axis in fine-tuning too; a head-foot flip maps apical onto basal
        disease, which is a different diagnosis (docs/data.md's experiment classes differ exactly there).
        """
        values: dict[str, Any] = dict(lr=1e-5, weight_decay=1e-3, batch_size=4, warmup_frac=0.1, flip_axes=(2,),
                                      rot90_p=0.0)
        values.update({_norm_key(k): v for k, v in overrides.items()})
        return from_mapping(cls, values, source="finetune config")
