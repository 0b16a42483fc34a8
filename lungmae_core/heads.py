"""ILD classifier on the MAE encoder, strict weight transfer from the MAE, and what fine-tuning trains.

The classifier is the pretrained encoder run on all tokens (no masking), pooled, then LayerNorm and
Linear(E -> classes), as in the paper (docs/model.md). Pooling: the paper's mean over tokens or a new CLS token, or (our
default) the mean weighted by each token's lung fraction, the pooling counterpart of the paper's
lung-weighted loss: ILD is a lung finding, and a plain mean lets body, heart and air tokens (most of a
64^3 cube) dominate. Measured on the simulation's phantoms (central, MAE 20 epochs + 30 fine-tuning epochs,
144 train / 96 held out): balanced accuracy 0.64 vs 0.56 for the mean, ROC AUC 0.83 vs 0.79. Linear probing
trains only the head, its norm and the CLS token (the public code forgot to unfreeze the CLS token);
``last-K`` trains those plus the encoder's last ``K`` blocks and final norm, the DP-friendly middle ground
(under DP-SGD the noise grows with the trained dimension, so training fewer parameters keeps more signal).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from lungmae_core.config import ModelConfig, check
from lungmae_core.errors import ConfigError, WeightsMismatchError
from lungmae_core.loss import lung_fraction_per_patch
from lungmae_core.model import LearnedToken, ViTEncoder3D

__all__ = ["POOLINGS", "DEFAULT_POOLING", "FINETUNE_MODES", "ILDClassifier", "transfer_encoder", "set_trainable",
           "parse_finetune_mode", "narrow_trainable", "trainable_state_dict"]

POOLINGS = ("lung", "mean", "cls")
DEFAULT_POOLING = "lung"
#: Weight of a token without lung in ``lung`` pooling, relative to an all-lung token (keeps a scan whose mask
#: is empty, or nearly, pooled over all its tokens instead of dividing by zero).
_NON_LUNG_TOKEN_WEIGHT = 1e-3
#: Named fine-tuning modes; besides these, ``"last-K"`` (K >= 1) trains the probe plus the last K blocks.
FINETUNE_MODES = ("full", "linear-probe")
#: Parameter-name prefixes that train in linear probing.
_PROBE_PREFIXES = ("head.", "norm.", "cls_token.")
_LAST_K = re.compile(r"last-([1-9][0-9]?)")


class ILDClassifier(nn.Module):
    """Encoder (all tokens) -> pooling -> LayerNorm -> Linear: logits (B, num_classes).

    Args:
        cfg: the architecture; the encoder part must match the MAE whose weights are transferred.
        num_classes: output classes (4 for the ILD task, 2 for the binary variant).
        pooling: ``"lung"`` (default): the mean over the L tokens weighted by each token's lung fraction
            (needs the lung mask in :meth:`forward`); ``"mean"`` over the L tokens; or ``"cls"``, a learned
            token prepended to them. ``lung`` and ``mean`` have the same parameters.

    Raises:
        ConfigError: for an unknown pooling or fewer than 2 classes.

    Examples:
        >>> clf = ILDClassifier(model_config("tiny"), num_classes=4)
        >>> clf(torch.rand(2, 1, 64, 64, 64), torch.ones(2, 1, 64, 64, 64)).shape
        torch.Size([2, 4])
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, pooling: str = DEFAULT_POOLING) -> None:
        super().__init__()
        check(pooling in POOLINGS, f"pooling must be one of {', '.join(map(repr, POOLINGS))}; got {pooling!r}")
        check(isinstance(num_classes, int) and num_classes >= 2,
              f"num_classes must be an integer >= 2; got {num_classes!r}")
        self.cfg, self.num_classes, self.pooling = cfg, num_classes, pooling
        self.encoder = ViTEncoder3D.from_config(cfg)
        self.cls_token = LearnedToken(cfg.embed_dim) if pooling == "cls" else None
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def needs_lung_mask(self) -> bool:
        """Whether :meth:`forward` must be given the lung mask (``lung`` pooling)."""
        return self.pooling == "lung"

    def features(self, imgs: torch.Tensor, lung_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, normalised features: imgs (B, C, S, S, S) [+ lung_mask (B, 1, S, S, S)] -> (B, E)."""
        if self.needs_lung_mask and lung_mask is None:
            raise ValueError("Unable to pool over the lungs as no lung mask was given; call "
                             "model(images, lung_mask) or build the classifier with pooling='mean'")
        x = self.encoder.embed(imgs)  # (B, L, E)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token(x), x], dim=1)  # (B, 1 + L, E)
        x = self.encoder.encode_tokens(x)
        if self.cls_token is not None:
            pooled = x[:, 0]
        elif self.needs_lung_mask and lung_mask is not None:  # (not None: checked above)
            weights = lung_fraction_per_patch(lung_mask, self.cfg.patch_size) + _NON_LUNG_TOKEN_WEIGHT  # (B, L)
            weights = weights / weights.sum(dim=1, keepdim=True)
            pooled = (x * weights.unsqueeze(-1).to(x.dtype)).sum(dim=1)
        else:
            pooled = x.mean(dim=1)  # (B, E)
        features: torch.Tensor = self.norm(pooled)
        return features

    def forward(self, imgs: torch.Tensor, lung_mask: torch.Tensor | None = None) -> torch.Tensor:
        """imgs: (B, C, S, S, S) float32 in [0, 1], lung_mask: (B, 1, S, S, S) 0/1 -> logits (B, num_classes).

        ``lung_mask`` is needed for ``lung`` pooling and ignored otherwise.
        """
        logits: torch.Tensor = self.head(self.features(imgs, lung_mask))
        return logits


def _encoder_state(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of an MAE (module or state dict), keyed without the prefix."""
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise WeightsMismatchError(
            "Unable to transfer encoder weights as the source has no 'encoder.*' entries; expected an MAE3D "
            f"or its state dict (first keys: {', '.join(list(state)[:5]) or 'none'})")
    unexpected = [k for k in state if not k.startswith(("encoder.", "decoder."))]
    if unexpected:
        raise WeightsMismatchError(
            "Unable to transfer encoder weights as the source has entries that belong to neither the encoder "
            f"nor the decoder: {', '.join(unexpected)}")
    return encoder


def transfer_encoder(source: nn.Module | Mapping[str, torch.Tensor], classifier: ILDClassifier) -> list[str]:
    """Copy the MAE's encoder weights into ``classifier.encoder``, strictly by name and shape.

    The decoder entries are dropped on purpose; everything else must match exactly, so that a pretrained
    encoder is never silently half-loaded.

    Args:
        source: an ``MAE3D`` or its state dict (keys ``encoder.*`` and ``decoder.*``).
        classifier: the model that receives the weights (its head, norm and CLS token are left alone).

    Returns:
        The classifier parameter/buffer names that were loaded (``encoder.*``).

    Raises:
        WeightsMismatchError: listing every missing, unexpected and shape-mismatched key.
    """
    weights = _encoder_state(source)
    target = classifier.encoder.state_dict()
    missing = sorted(set(target) - set(weights))
    unexpected = sorted(set(weights) - set(target))
    mismatched = [f"encoder.{k} {tuple(weights[k].shape)} vs {tuple(target[k].shape)}"
                  for k in sorted(set(target) & set(weights)) if tuple(weights[k].shape) != tuple(target[k].shape)]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(f"encoder.{k}" for k in missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(f"encoder.{k}" for k in unexpected))
    if mismatched:
        problems.append("shape mismatch (source vs classifier) " + ", ".join(mismatched))
    if problems:
        raise WeightsMismatchError("Unable to transfer encoder weights as they do not fit the classifier: "
                                   + "; ".join(problems) + ". Build both from the same model config.")
    classifier.encoder.load_state_dict(weights, strict=True)
    return [f"encoder.{k}" for k in target]


def parse_finetune_mode(mode: str, *, key: str = "finetune mode") -> int | None:
    """How many encoder blocks a fine-tuning mode trains: ``None`` for all (``full``), 0 for
    ``linear-probe``, ``K`` for ``last-K``.

    Raises:
        ConfigError: naming ``key`` and the modes allowed.

    Examples:
        >>> parse_finetune_mode("last-2"), parse_finetune_mode("linear-probe"), parse_finetune_mode("full")
        (2, 0, None)
    """
    if mode == "full":
        return None
    if mode == "linear-probe":
        return 0
    match = _LAST_K.fullmatch(mode) if isinstance(mode, str) else None
    if match is None:
        raise ConfigError(f"{key} must be 'full', 'linear-probe' or 'last-K' (K in 1..99, e.g. 'last-2'); "
                          f"got {mode!r}")
    return int(match.group(1))


def _trains(name: str, blocks: int | None, depth: int) -> bool:
    """Whether parameter ``name`` trains when the last ``blocks`` of ``depth`` encoder blocks do."""
    if blocks is None or name.startswith(_PROBE_PREFIXES):
        return True
    if blocks == 0:
        return False
    if name.startswith("encoder.norm."):
        return True
    match = re.match(r"encoder\.blocks\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= depth - blocks


def set_trainable(model: ILDClassifier, mode: str = "full") -> list[str]:
    """Freeze or unfreeze parameters for fine-tuning.

    Args:
        model: the classifier.
        mode: ``"full"`` trains everything; ``"linear-probe"`` trains only ``head``, ``norm`` and ``cls_token``;
            ``"last-K"`` trains those, the last ``K`` encoder blocks and the encoder's final norm.

    Returns:
        Names of the parameters left trainable.

    Raises:
        ConfigError: for an unknown mode, or ``K`` above the encoder's depth.
    """
    blocks = parse_finetune_mode(mode)
    depth = len(model.encoder.blocks)
    if blocks is not None and blocks > depth:
        raise ConfigError(f"finetune mode {mode!r} trains {blocks} blocks but the encoder has only {depth}")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(_trains(name, blocks, depth))
        if param.requires_grad:
            names.append(name)
    return names


def narrow_trainable(model: nn.Module, mode: str) -> list[str]:
    """Freeze what ``mode`` does not train; never unfreezes (a site can narrow the server's request only).

    Used by DP fine-tuning: the site's ``privacy.finetune-trainable`` caps what trains whatever mode the
    server asked for. ``K`` larger than the depth means every block.

    Returns:
        Names of the parameters still trainable.
    """
    blocks = parse_finetune_mode(mode)
    encoder = getattr(model, "encoder", None)
    depth = len(encoder.blocks) if isinstance(encoder, ViTEncoder3D) else 0
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad and not _trains(name, blocks, depth):
            param.requires_grad_(False)
        if param.requires_grad:
            names.append(name)
    return names


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only (what a linear-probe round needs to exchange), detached."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
