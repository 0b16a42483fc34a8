"""Hyperparameters of one local training phase (:class:`TrainConfig`): MAE pretraining or classifier
fine-tuning, with the paper's settings as :meth:`TrainConfig.pretrain_defaults` and
:meth:`TrainConfig.finetune_defaults`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from lungmae_core.config.loader import check, from_mapping, norm_key

__all__ = ["TrainConfig"]


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
        norm_pix_target: MAE pretraining predicts each masked patch's normalized voxels (minus the patch mean,
            over its standard deviation; He et al. 2022) instead of its raw intensities. Defaults to False
            (the paper's raw-intensity target).

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
    norm_pix_target: bool = False

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
        values.update({norm_key(k): v for k, v in overrides.items()})
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
        values.update({norm_key(k): v for k, v in overrides.items()})
        return from_mapping(cls, values, source="finetune config")
