"""3D masked autoencoder (MAE) for chest CT: patchify, random masking, ViT encoder on visible tokens, decoder.

The model follows He et al.'s MAE step by step, in 3D: a volume ``(B, 1, D, H, W)`` is cut into cubic
patches, a linear layer embeds each patch, learnable absolute position embeddings are added, a random 75% of
the tokens are dropped per sample, a pre-norm ViT encodes the visible 25%, and a lighter decoder gets mask
tokens plus its own position embeddings and predicts the voxel values of every patch (no normalised-pixel
target). The lung-weighted loss lives in :mod:`lungmae_core.loss` so the classifier can reuse the encoder.

Shorthand in docstrings: B batch, C channels, L tokens of a whole volume, P = p**3 * C voxels per patch,
E encoder width, mask ``(B, L)`` with 0 keep / 1 masked.

References:
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
    Dack et al., "Unmasking Interstitial Lung Diseases: Leveraging Masked Autoencoders for Diagnosis", 2025.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lungmae_core.config import INPUT_HU_MAX, INPUT_HU_MIN, ModelConfig, model_config

__all__ = [
    "patchify3d",
    "unpatchify3d",
    "random_masking",
    "LearnedPositionEmbedding",
    "LearnedToken",
    "Attention",
    "MLP",
    "Block",
    "ViTEncoder3D",
    "MAEDecoder3D",
    "MAE3D",
    "build_mae",
    "mae3d_vit_tiny_patch16",
    "mae3d_vit_base_patch16",
    "mae3d_vit_base_patch8",
]


def patchify3d(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Cut volumes into flattened cubic patches, in raster order over (D, H, W).

    Args:
        imgs: (B, C, D, H, W), each of D, H, W divisible by ``p``.
        p: patch side in voxels.

    Returns:
        (B, L, P) with L = (D/p)(H/p)(W/p) and P = p**3 * C; voxels inside a patch are ordered (pd, ph, pw, C).
    """
    b, c, d, h, w = imgs.shape
    assert d % p == 0 and h % p == 0 and w % p == 0, f"volume {(d, h, w)} not divisible by patch {p}"
    gd, gh, gw = d // p, h // p, w // p
    x = imgs.reshape(b, c, gd, p, gh, p, gw, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gd, gh, gw, p, p, p, C)
    return x.reshape(b, gd * gh * gw, p ** 3 * c)  # (B, L, P)


def unpatchify3d(x: torch.Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify3d`.

    Args:
        x: (B, L, P) with L = gd * gh * gw and P = p**3 * channels.
        p: patch side in voxels.
        grid: patches per axis ``(gd, gh, gw)``.
        channels: C. Defaults to 1.

    Returns:
        (B, C, gd*p, gh*p, gw*p).
    """
    b, n, dim = x.shape
    gd, gh, gw = grid
    assert n == gd * gh * gw and dim == p ** 3 * channels, f"tokens {(n, dim)} do not fit grid {grid}, p={p}"
    x = x.reshape(b, gd, gh, gw, p, p, p, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gd, p, gh, p, gw, p)
    return x.reshape(b, channels, gd * p, gh * p, gw * p)


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE), reproducible through ``generator``.

    Args:
        x: (B, L, E) tokens.
        mask_ratio: fraction of tokens to drop, in [0, 1); ``int(L * (1 - mask_ratio))`` are kept.
        generator: source of the noise; it may live on another device than ``x``. ``None``: global RNG.

    Returns:
        x_kept (B, L_keep, E); mask (B, L) float, 0 keep / 1 masked, in the original token order;
        ids_restore (B, L), the permutation that puts shuffled tokens back in order.
    """
    b, n, e = x.shape
    len_keep = int(n * (1 - mask_ratio))
    assert 1 <= len_keep <= n, f"mask_ratio {mask_ratio} keeps {len_keep} of {n} tokens"
    noise_device = generator.device if generator is not None else x.device
    noise = torch.rand(b, n, generator=generator, device=noise_device).to(x.device)  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, e))  # (B, L_keep, E): the one copy
    # Token t is kept iff its place in the shuffled order is among the first len_keep: the mask follows from
    # ids_restore without building a shuffled mask and gathering it back (same values, one gather fewer).
    mask = (ids_restore >= len_keep).to(torch.float32)  # (B, L), token order
    return x_kept, mask, ids_restore


class LearnedPositionEmbedding(nn.Module):
    """Learnable absolute position embedding added to the tokens: ``forward(x) = x + weight``.

    A module of its own (not a bare parameter) so that Opacus can be given a per-sample grad sampler: the
    per-sample gradient of ``weight`` is simply the gradient of the output for that sample.

    Args:
        num_tokens: L. embed_dim: E.
    """

    def __init__(self, num_tokens: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, E) -> (B, L, E)."""
        return x + self.weight


class LearnedToken(nn.Module):
    """A learnable token (mask token, CLS token) repeated over the batch: ``forward(x) -> (B, 1, E)``.

    ``x`` only gives the batch size (and device); the output carries the token once per sample, so the
    per-sample gradient of ``weight`` is the output's gradient for that sample (what Opacus needs).

    Args:
        embed_dim: E.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The output does not depend on x's values, so autograd never computes a gradient for x through
        # here; a full backward hook (Opacus' per-sample gradients) fires only for inputs that need no grad.
        # Detaching x before the hooks run makes Opacus see this module's output gradient.
        out: torch.Tensor = super().__call__(x.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ...) -> (B, 1, E)."""
        return self.weight.expand(x.shape[0], -1, -1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, E) -> (B, N, E)."""
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, e // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, E/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, E/heads)
        out: torch.Tensor = self.proj(x.transpose(1, 2).reshape(b, n, e))
        return out


class MLP(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


#: Window ramps reach the patch embedding as means over blocks of this many voxels per axis (when it divides
#: the patch size; else the largest common divisor).
WINDOW_BLOCK = 2


class ViTEncoder3D(nn.Module):
    """ViT encoder over cubic patches: linear patch embedding, learned positions, pre-norm blocks, LayerNorm.

    The MAE runs it on the visible tokens only (:meth:`embed`, masking, then :meth:`encode_tokens`); the
    classifier runs it on all tokens (:meth:`forward`).

    Args:
        img_size: side of the input cube in voxels. patch_size: side of a patch; divides ``img_size``.
        in_chans: C. embed_dim: E. depth: number of blocks. num_heads: attention heads. mlp_dim: MLP width.
        input_mean, input_std: the input is standardised, ``(x - input_mean) / input_std``, before the patch
            embedding (see :class:`~lungmae_core.config.ModelConfig`: without centring the tiny ViT cannot fit).
        input_windows: HU windows ``(lo, hi)``, each adding a ramp channel per input channel (ModelConfig).

    Examples:
        >>> enc = ViTEncoder3D(img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_dim=768)
        >>> enc(torch.zeros(2, 1, 64, 64, 64)).shape
        torch.Size([2, 64, 192])
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_dim: int = 3072, input_mean: float = 0.55,
                 input_std: float = 0.35, input_windows: Sequence[tuple[float, float]] = (),
                 stem: str = "linear") -> None:
        super().__init__()
        assert img_size % patch_size == 0, (img_size, patch_size)
        assert input_std > 0, input_std
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        self.input_windows = tuple((float(lo), float(hi)) for lo, hi in input_windows)
        self.grid = (img_size // patch_size,) * 3
        self.num_patches = self.grid[0] ** 3
        # Window ramps are read as means over blocks of `window_block` voxels: a soft histogram per block is
        # what they are for; at full resolution the tiny MAE step took 75 vs 54 ms for a gain within noise
        # (held-out balanced accuracy 0.55 vs 0.53).
        self.window_block = math.gcd(patch_size, WINDOW_BLOCK)
        window_dim = (patch_size // self.window_block) ** 3 * in_chans * len(self.input_windows)
        self.patch_embed: nn.Module = nn.Linear(patch_size ** 3 * in_chans + window_dim, embed_dim)
        self.stem = stem
        if stem == "conv":  # ModelConfig.stem: a patch-local convolutional stem (lungmae_core.stem)
            from lungmae_core.stem import ConvStem3D

            self.patch_embed = ConvStem3D(in_chans * (1 + len(self.input_windows)), patch_size, embed_dim)
        self.pos_embed = LearnedPositionEmbedding(self.num_patches, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.apply(_init_weights)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ViTEncoder3D:
        """Build the encoder described by ``cfg``."""
        return cls(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                   cfg.mlp_dim, cfg.input_mean, cfg.input_std, cfg.input_windows, cfg.stem)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, S, S, S) -> tokens with positions (B, L, E)."""
        expected = (self.in_chans,) + (self.img_size,) * 3
        assert tuple(imgs.shape[1:]) == expected, f"input {tuple(imgs.shape[1:])} != expected {expected}"
        if self.stem == "conv":
            from lungmae_core.stem import stem_inputs

            tokens: torch.Tensor = self.pos_embed(self.patch_embed(stem_inputs(imgs, self.input_mean, self.input_std,
                                                                               self.input_windows)))
            return tokens
        out: torch.Tensor = self.pos_embed(self.patch_embed(self.patch_inputs(imgs)))
        return out

    def patch_inputs(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the patch embedding reads per token: the patch's voxels, then its window-ramp block means.

        imgs (B, C, S, S, S) in [0, 1] -> (B, L, p^3 C + (p / block)^3 C W), all standardised with
        ``(x - input_mean) / input_std``.
        """
        tokens = patchify3d((imgs - self.input_mean) / self.input_std, self.patch_size)
        if not self.input_windows:
            return tokens
        hu = imgs * (INPUT_HU_MAX - INPUT_HU_MIN) + INPUT_HU_MIN
        ramps = torch.cat([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in self.input_windows], dim=1)
        if self.window_block > 1:
            ramps = F.avg_pool3d(ramps, self.window_block)
        ramps = (ramps - self.input_mean) / self.input_std
        return torch.cat([tokens, patchify3d(ramps, self.patch_size // self.window_block)], dim=-1)

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the final norm on any token sequence: (B, N, E) -> (B, N, E)."""
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.norm(x)
        return out

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encode all tokens (no masking): imgs (B, C, S, S, S) -> (B, L, E)."""
        return self.encode_tokens(self.embed(imgs))


class MAEDecoder3D(nn.Module):
    """MAE decoder: project the visible latents, fill in mask tokens, add positions, blocks, predict voxels.

    Args:
        num_patches: L. patch_dim: P. embed_dim: encoder width E. decoder_embed_dim, decoder_depth,
        decoder_num_heads, decoder_mlp_dim: the decoder's own sizes.
    """

    def __init__(self, num_patches: int, patch_dim: int, embed_dim: int, decoder_embed_dim: int,
                 decoder_depth: int, decoder_num_heads: int, decoder_mlp_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = LearnedToken(decoder_embed_dim)
        self.pos_embed = LearnedPositionEmbedding(num_patches, decoder_embed_dim)
        self.blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_dim) for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(decoder_embed_dim)
        self.pred = nn.Linear(decoder_embed_dim, patch_dim)
        self.apply(_init_weights)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (B, L_keep, E), ids_restore: (B, L) -> predicted patches (B, L, P)."""
        x = self.embed(latent)  # (B, L_keep, Ed)
        b, n_keep, dim = x.shape
        n = ids_restore.shape[1]
        fill = self.mask_token(x).expand(b, n - n_keep, dim)  # (B, L - L_keep, Ed)
        x = torch.cat([x, fill], dim=1)  # shuffled order: kept first
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # (B, L, Ed), token order
        x = self.pos_embed(x)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.pred(self.norm(x))  # (B, L, P)
        return out


class MAE3D(nn.Module):
    """3D masked autoencoder: ``forward`` = ``forward_encoder`` (visible tokens only) then ``forward_decoder``.

    Args:
        cfg: the architecture (``model_config("tiny")``, ``model_config("paper-p16")``...).

    Examples:
        >>> mae = MAE3D(model_config("tiny"))
        >>> pred, mask = mae(torch.rand(2, 1, 64, 64, 64))
        >>> pred.shape, mask.shape, int(mask.sum(1)[0])  # 64 tokens of 16**3 voxels, 48 masked
        (torch.Size([2, 64, 4096]), torch.Size([2, 64]), 48)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder3D.from_config(cfg)
        self.decoder = MAEDecoder3D(cfg.num_patches, cfg.patch_dim, cfg.embed_dim, cfg.decoder_embed_dim,
                                    cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_dim)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, S, S, S) -> (B, L, P), the reconstruction target layout."""
        return patchify3d(imgs, self.cfg.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, P) -> (B, C, S, S, S)."""
        return unpatchify3d(x, self.cfg.patch_size, (self.cfg.grid_size,) * 3, self.cfg.in_chans)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, S, S, S) -> latent (B, L_keep, E), mask (B, L), ids_restore (B, L)."""
        x = self.encoder.embed(imgs)  # (B, L, E)
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)
        return self.encoder.encode_tokens(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, L_keep, E), ids_restore (B, L) -> predicted voxels (B, L, P)."""
        out: torch.Tensor = self.decoder(latent, ids_restore)
        return out

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode, decode.

        Args:
            imgs: (B, C, S, S, S) float32, HU windowed to [0, 1].
            mask_ratio: fraction of patches hidden; ``None``: ``cfg.mask_ratio``.
            generator: makes the masks reproducible.

        Returns:
            pred (B, L, P) voxel values of every patch (the loss reads the masked ones); mask (B, L) 0/1 float.
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        return self.forward_decoder(latent, ids_restore), mask


def build_mae(cfg: ModelConfig | str, *, seed: int | None = None) -> MAE3D:
    """Build an MAE from a config or a config name; ``seed`` makes the initial weights reproducible."""
    cfg = model_config(cfg) if not isinstance(cfg, ModelConfig) else cfg
    if seed is None:
        return MAE3D(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MAE3D(cfg)


def mae3d_vit_tiny_patch16(**overrides: object) -> MAE3D:
    """The ``tiny`` CPU config: 64**3 input, patch 16, encoder 192/4/3, decoder 128/2/4."""
    return MAE3D(model_config("tiny", **overrides))


def mae3d_vit_base_patch16(**overrides: object) -> MAE3D:
    """The paper's main model (``paper-p16``): 128**3, patch 16, ViT-B encoder, decoder 512/8/8."""
    return MAE3D(model_config("paper-p16", **overrides))


def mae3d_vit_base_patch8(**overrides: object) -> MAE3D:
    """``paper-p8``: 128**3, patch 8 (4096 tokens), ViT-B encoder, decoder 512/8/8."""
    return MAE3D(model_config("paper-p8", **overrides))
