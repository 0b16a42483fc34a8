"""Local training and evaluation of one phase: MAE pretraining and ILD classifier fine-tuning.

One call trains one phase on one dataset for ``epochs`` passes or ``max_steps`` steps and returns a dict of
aggregate metrics (plain floats and ints), the way MAE's ``train_one_epoch`` does. The same functions serve
the centralized pipeline and a federated site's round: the learning-rate curve can be one segment of a
global warmup + cosine schedule (:class:`WarmupCosine`), and a :class:`PrivacyHook` can turn the optimizer
and loader into DP-SGD ones (Opacus) without changing the loop.

Dataset items are dicts ``{"image": (1, S, S, S) float32 in [0, 1], "lung_mask": (1, S, S, S) float32 0/1,
"label": int}`` (``-1``: unlabelled), as ``lungmae_core.data`` yields them.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import nullcontext
from typing import Any, Protocol, TypedDict, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lungmae_core.config import ModelConfig, TrainConfig
from lungmae_core.errors import ConfigError, DatasetError, NonFiniteLossError
from lungmae_core.heads import set_trainable
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1, mae_target, patch_l1
from lungmae_core.metrics import classification_metrics
from lungmae_core.model import ViTEncoder3D
from lungmae_core.transforms import random_flip_rot90_batch

__all__ = [
    "PrivacyHook",
    "LRSchedule",
    "LocalRun",
    "WarmupCosine",
    "warmup_cosine",
    "resolve_device",
    "class_weights_from_labels",
    "train_mae",
    "evaluate_mae",
    "train_classifier",
    "evaluate_classifier",
]

logger = logging.getLogger(__name__)

# Step -> lr multiplier (of ``TrainConfig.lr``); either ``f(step)`` or ``f(step, total_steps)``.
LRSchedule = Callable[..., float]


class PrivacyHook(Protocol):
    """Turns a model, optimizer and loader into their DP-SGD versions (``lungmae_core.privacy``).

    ``train_mae``/``train_classifier`` call ``make_private`` once, after building the AdamW optimizer and the
    DataLoader, and then train only with what it returns. The returned loader may yield empty batches
    (Poisson sampling); the loops still call ``optimizer.step()`` for them (a noise-only DP-SGD step).
    """

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     loader: DataLoader[Any]) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any]]: ...


def warmup_cosine(progress: float, warmup_frac: float = 0.1, min_mult: float = 0.0) -> float:
    """The lr multiplier at ``progress`` in [0, 1] of a run: linear warmup then cosine decay to ``min_mult``."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_frac > 0 and progress < warmup_frac:
        return progress / warmup_frac
    t = (progress - warmup_frac) / max(1.0 - warmup_frac, 1e-12)
    return min_mult + (1.0 - min_mult) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    """One segment ``[start, end]`` (fractions of the whole run) of a global warmup + cosine lr curve.

    Local training of ``n`` steps evaluates the curve at the middle of each step,
    ``start + (end - start) * (step + 0.5) / n``, so consecutive segments continue one curve: a federation of
    R rounds gives round r (1-based) ``WarmupCosine(warmup_frac, (r - 1) / R, r / R)`` and every site follows
    the same global schedule whatever its number of local steps. The default segment ``[0, 1]`` is the
    paper's schedule for one centralized run (10% warmup then cosine).

    Args:
        warmup_frac: fraction of the whole run spent in linear warmup. Defaults to 0.1.
        start, end: this segment, 0 <= start < end <= 1. Defaults to 0 and 1.
        min_mult: multiplier at the very end of the run. Defaults to 0.

    Raises:
        ConfigError: for a segment outside [0, 1] or empty.
    """

    def __init__(self, warmup_frac: float = 0.1, start: float = 0.0, end: float = 1.0,
                 min_mult: float = 0.0) -> None:
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(f"lr schedule segment must satisfy 0 <= start < end <= 1; got [{start}, {end}]")
        if not 0.0 <= warmup_frac < 1.0:
            raise ConfigError(f"warmup_frac must be in [0, 1); got {warmup_frac!r}")
        self.warmup_frac, self.start, self.end, self.min_mult = warmup_frac, start, end, min_mult

    def __call__(self, step: int, total_steps: int) -> float:
        progress = self.start + (self.end - self.start) * (step + 0.5) / max(total_steps, 1)
        return warmup_cosine(progress, self.warmup_frac, self.min_mult)

    def __repr__(self) -> str:
        return f"WarmupCosine(warmup_frac={self.warmup_frac}, start={self.start}, end={self.end})"


def _multiplier_fn(lr_schedule: LRSchedule | None, cfg: TrainConfig) -> Callable[[int, int], float]:
    """Normalise ``lr_schedule`` to ``f(step, total_steps)``; ``None`` is the config's warmup + cosine."""
    if lr_schedule is None:
        return WarmupCosine(cfg.warmup_frac)
    try:
        params = [p for p in inspect.signature(lr_schedule).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        one_arg = len(params) == 1
    except (TypeError, ValueError):  # builtins without a signature: assume f(step, total_steps)
        one_arg = False
    return (lambda step, total: lr_schedule(step)) if one_arg else lr_schedule


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a device that exists here.

    Raises:
        ConfigError: when CUDA (or device N) is asked for but not available, or the name is unknown.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available (torch {torch.__version__},"
                              f" {build}); use device 'cpu' or 'auto'")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device(name)
    raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}")


def class_weights_from_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights from the TRAINING split's labels, ``N / (K * n_c)``.

    Unlabelled entries (``-1``) are ignored. A class absent from the labels gets weight 0 (no sample of it
    can appear in the loss), so the weights stay finite.

    Args:
        labels: (N,) ints in [0, num_classes) or -1.
        num_classes: K.

    Returns:
        (K,) float32; a balanced split gives all ones.

    Raises:
        DatasetError: when no label is given or a label is out of range.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    y = y[y != -1]
    if len(y) == 0:
        raise DatasetError("Unable to compute class weights as the training split has no labelled scan")
    if y.min() < 0 or y.max() >= num_classes:
        bad = sorted(set(y[(y < 0) | (y >= num_classes)].tolist()))
        raise DatasetError(f"Unable to compute class weights as labels {bad} are outside [0, {num_classes})")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(y), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.as_tensor(weights, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Shared plumbing of the two training loops
# ---------------------------------------------------------------------------------------------------------


def _layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: 0 for the patch embedding and positions, i + 1 for encoder
    block i, ``depth + 1`` for everything after the blocks (final norms, head, CLS token, decoder)."""
    name = name.removeprefix("_module.")  # under Opacus' GradSampleModule
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def _param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups as in MAE: no weight decay on biases, norms, tokens and position embeddings.

    With ``layer_decay < 1`` every group also carries ``lr_scale = layer_decay ** (depth + 1 - layer)``
    (MAE's fine-tuning recipe); :class:`_Loop` multiplies the scheduled lr by it.
    """
    encoder = getattr(_core(model), "encoder", None)
    depth = len(encoder.blocks) if isinstance(encoder, ViTEncoder3D) else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "pos_embed" in name or "token" in name
        layer = _layer_id(name, depth) if layer_decay < 1.0 else depth + 1
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def _check_volume_size(images: torch.Tensor, cfg: ModelConfig) -> None:
    expected = (cfg.in_chans,) + (cfg.img_size,) * 3
    if tuple(images.shape[1:]) != expected:
        raise DatasetError(
            f"Unable to train as the dataset's volumes are {tuple(images.shape[1:])} but model config "
            f"{cfg.name!r} expects {expected}; prepare the cache at that size or load it with size={cfg.img_size}")


def _batch_len(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["image"].shape[0])


def _autocast(device: torch.device, amp: str) -> Any:
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class LocalRun(TypedDict, total=False):
    """How one call of :func:`train_mae` or :func:`train_classifier` runs: their keyword arguments, all optional.

    Keys:
        device: ``"cpu"`` (default), ``"cuda"``, ``"auto"`` or a ``torch.device``.
        seed: seeds shuffling, augmentation and masking (default 0); the same seed and weights give the same
            result.
        privacy: DP-SGD hook (``lungmae_core.privacy.OpacusPrivacy``) or ``None`` (default).
        lr_schedule: ``f(step)`` or ``f(step, total_steps)`` giving the multiplier of ``cfg.lr``, e.g. a
            :class:`WarmupCosine` segment of the federation's global curve. ``None`` (default): warmup + cosine
            over this call.
        progress: show a tqdm bar (default ``False``).
        proximal_mu: FedProx proximal weight; the starting weights are the anchor (0, the default: plain
            training, bit for bit). Independent of ``privacy``.
        optimizer_state: a dict kept by the caller across calls of one training run: AdamW's state is loaded
            from it (when it holds one) and saved into it at the end, so a run split into per-epoch calls keeps
            one optimizer. ``None`` (default): a fresh optimizer (a federated round's local training).
    """

    device: str | torch.device
    seed: int
    privacy: PrivacyHook | None
    lr_schedule: LRSchedule | None
    progress: bool
    proximal_mu: float
    optimizer_state: dict[str, Any] | None


class _Loop:
    """Optimizer, loader, schedule, AMP and DP for one phase; yields batches and performs the steps."""

    def __init__(self, model: nn.Module, dataset: Dataset[Any], cfg: TrainConfig, *, desc: str,
                 device: str | torch.device = "cpu", seed: int = 0, privacy: PrivacyHook | None = None,
                 lr_schedule: LRSchedule | None = None, progress: bool = False, proximal_mu: float = 0.0,
                 optimizer_state: dict[str, Any] | None = None) -> None:
        """Everything but ``desc`` (the phase, for the progress bar and errors) as in :class:`LocalRun`,
        whose defaults are these; the model is moved to the device and put in training mode."""
        if _num_items(dataset) == 0:
            raise DatasetError(f"Unable to {desc} as the dataset is empty")
        device = _as_device(device)
        model.to(device).train()
        self.cfg, self.device, self.privacy, self.seed = cfg, device, privacy, seed
        self.loader_gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=self.loader_gen,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=False)
        # fused AdamW: one kernel over all parameters (several times faster on CPU than the per-tensor loop)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
        # One optimizer per training run: a caller that trains a run in several calls (an epoch each, to
        # evaluate in between) hands the same dict back and AdamW's moments carry over.
        self.optimizer_state = optimizer_state
        if optimizer_state:
            optimizer.load_state_dict(optimizer_state["state_dict"])
        if privacy is not None:
            model, optimizer, loader = privacy.make_private(model, optimizer, loader)
        if proximal_mu != 0:
            _add_proximal_term(model, optimizer, proximal_mu)
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.steps_per_epoch = max(len(loader), 1)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.multiplier = _multiplier_fn(lr_schedule, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
        self.autocast = _autocast(device, cfg.amp)
        self.bar = tqdm(total=self.total_steps, desc=desc, disable=not progress, leave=False)
        self.step = 0
        self.lr = cfg.lr
        self.start = time.perf_counter()

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches on the device with their lr set, until the step budget is spent."""
        while self.step < self.total_steps:
            step_before = self.step
            for batch in self.loader:
                if self.step >= self.total_steps:
                    break
                self.lr = self.cfg.lr * float(self.multiplier(self.step, self.total_steps))
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr * group.get("lr_scale", 1.0)
                if _batch_len(batch) == 0:
                    self.empty_step()
                    continue
                yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                       for k, v in batch.items()}
            if self.step == step_before:
                raise DatasetError(f"Unable to train as the data loader yielded no batch in a whole pass "
                                   f"({len(self.loader.dataset)} items)")  # type: ignore[arg-type]

    def empty_step(self) -> None:
        """Poisson sampling picked nobody: under DP-SGD this is still a (noise-only) step."""
        if self.privacy is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)

    def backward_step(self, loss: torch.Tensor) -> None:
        """Check the loss, backpropagate, clip (not under DP: Opacus clips per sample) and step."""
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(f"Loss is {loss.item()} at step {self.step + 1} of {self.total_steps} "
                                     f"(lr {self.lr:.3g}); stopping training")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # torch leaves backward unannotated
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves backward unannotated
        if self.cfg.grad_clip is not None and self.privacy is None:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.lr:.2e}")

    def close(self) -> float:
        self.bar.close()
        if self.optimizer_state is not None:
            self.optimizer_state["state_dict"] = self.optimizer.state_dict()
        return time.perf_counter() - self.start


def _add_proximal_term(model: nn.Module, optimizer: torch.optim.Optimizer, mu: float) -> None:
    """FedProx (Li et al., 2020): add ``mu * (w - w_start)`` to every trainable gradient right before each step.

    The gradient of ``mu/2 * ||w - w_global||^2`` does not depend on the data, so it is added after any
    clipping and DP noise (post-processing: no privacy cost). Opacus' ``DPOptimizer`` sets ``p.grad``
    (clipped + noised) and then calls its wrapped optimizer's ``step``: that inner step is the one patched.
    """
    if not math.isfinite(mu) or mu < 0:
        raise ConfigError(f"proximal_mu must be a finite number >= 0; got {mu}")
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    target = getattr(optimizer, "original_optimizer", optimizer)
    original_step = target.step

    def step(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            for p, p0 in zip(params, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=mu)
        return original_step(*args, **kwargs)

    target.step = step  # type: ignore[method-assign]


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _core(model: nn.Module) -> nn.Module:
    """The plain model under an Opacus ``GradSampleModule`` (its ``_module``), else the model itself."""
    core: nn.Module = getattr(model, "_module", model)
    return core


def _num_items(dataset: Dataset[Any]) -> int:
    """The length of a map-style dataset (torch's ``Dataset`` declares none; every dataset here has one)."""
    if not isinstance(dataset, Sized):
        raise DatasetError(f"Unable to train on a {type(dataset).__name__} as it has no length (a map-style "
                           "dataset with __len__ and __getitem__ is expected)")
    return len(dataset)


def _model_config(model: nn.Module) -> ModelConfig:
    """The ``ModelConfig`` the (possibly DP-wrapped) model was built from (``MAE3D`` / ``ILDClassifier``)."""
    cfg = getattr(_core(model), "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"Unable to train a {type(_core(model)).__name__} as it has no ModelConfig 'cfg'; build "
                        "the model with MAE3D or ILDClassifier")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# MAE pretraining
# ---------------------------------------------------------------------------------------------------------


def train_mae(model: nn.Module, dataset: Dataset[Any], cfg: TrainConfig,
              **run: Unpack[LocalRun]) -> dict[str, float | int]:
    """Pretrain an :class:`~lungmae_core.model.MAE3D` with the lung-weighted L1 loss for one phase.

    Each step augments image and lung mask together (flip/rot90), masks ``cfg.mask_ratio`` of the patches
    (from the model config), and minimises ``mean L1(lung) + w * mean L1(non-lung)`` over masked patches,
    pooled over the batch, or per sample under DP (see :mod:`lungmae_core.loss`).

    Args:
        model: the MAE, trained in place (moved to ``device``).
        dataset: items with ``image`` and ``lung_mask`` (1, S, S, S).
        cfg: hyperparameters (``TrainConfig.pretrain_defaults()``).
        run: device, seed, privacy, lr_schedule, progress, proximal_mu, optimizer_state (:class:`LocalRun`).

    Returns:
        ``MAE_TRAIN_KEYS``: mean ``loss``, ``loss_lung``, ``loss_non_lung`` over the steps (weighted by
        batch size), ``num_examples`` (dataset size), ``num_steps``, ``lr_last``, ``seconds``.

    Raises:
        NonFiniteLossError: at the first step whose loss is not finite.
        DatasetError: when the dataset is empty or its volumes do not fit the model config.
    """
    mcfg = _model_config(model)
    loop = _Loop(model, dataset, cfg, desc="pretrain", **run)
    aug_gen = torch.Generator().manual_seed(loop.seed + 1)
    mask_gen = torch.Generator().manual_seed(loop.seed + 2)
    sums = {"loss": 0.0, "loss_lung": 0.0, "loss_non_lung": 0.0}
    seen = 0
    for batch in loop.batches():
        images, lung = batch["image"], batch["lung_mask"]
        _check_volume_size(images, mcfg)
        images, lung = random_flip_rot90_batch(images, lung, aug_gen, cfg.flip_p, cfg.rot90_p, cfg.flip_axes)
        with loop.autocast:
            pred, mask = loop.model(images, mask_ratio=mcfg.mask_ratio, generator=mask_gen)
        parts = lung_weighted_l1(pred, mae_target(images, mcfg.patch_size, cfg.norm_pix_target), mask,
                                 lung_fraction_per_patch(lung, mcfg.patch_size), cfg.non_lung_weight,
                                 cfg.lung_threshold, per_sample=loop.privacy is not None)
        loss = parts.total.mean()
        loop.backward_step(loss)
        n = images.shape[0]
        seen += n
        sums["loss"] += loss.item() * n
        sums["loss_lung"] += parts.lung.mean().item() * n
        sums["loss_non_lung"] += parts.non_lung.mean().item() * n
    seconds = loop.close()
    result = {k: v / max(seen, 1) for k, v in sums.items()}
    result.update(num_examples=_num_items(dataset), num_steps=loop.step, lr_last=loop.lr, seconds=seconds)
    logger.info("pretrain: %d steps, loss %.4f (lung %.4f, non-lung %.4f), %.1f s", loop.step, result["loss"],
                result["loss_lung"], result["loss_non_lung"], seconds)
    return result


@torch.no_grad()
def evaluate_mae(model: nn.Module, dataset: Dataset[Any], *, device: str | torch.device = "cpu", seed: int = 0,
                 batch_size: int = 4, lung_threshold: float = 0.25,
                 norm_pix_target: bool = False) -> dict[str, float | int]:
    """Masked reconstruction L1, plain and on lung patches only, each beside a trivial predictor's.

    The trivial predictor outputs, at every patch position, the average patch of the OTHER scans of the
    evaluated dataset (the "mean anatomy", leave-one-out so it never sees the scan it predicts). An MAE whose L1
    is not clearly below the baseline's has learned nothing beyond the average anatomy, and its features are
    then no better than random for classification; reporting both makes that failure visible. Both are scored
    on the same masks (seeded by ``seed``), pooled over all masked patches of the dataset.

    Args:
        model: an ``MAE3D``. dataset: items with ``image`` and ``lung_mask``.
        device: as in :class:`LocalRun`. seed: seeds the masks. batch_size: volumes per forward pass.
        lung_threshold: lung patch threshold. Defaults to 0.25.
        norm_pix_target: score against normalized patches (the target of an MAE pretrained with
            ``TrainConfig.norm_pix_target``); the average patch is then the average normalized patch.

    Returns:
        ``MAE_EVAL_KEYS``: ``l1_masked``, ``l1_masked_lung``, ``baseline_l1_masked``,
        ``baseline_l1_masked_lung`` (0 where no masked lung patch exists), ``num_examples``.

    Raises:
        DatasetError: when the dataset is empty or its volumes do not fit the model config.
    """
    device = _as_device(device)
    if _num_items(dataset) == 0:
        raise DatasetError("Unable to evaluate the MAE as the dataset is empty")
    mcfg = _model_config(model)
    was_training = model.training
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)

    sum_patch = torch.zeros(mcfg.num_patches, mcfg.patch_dim, dtype=torch.float64, device=device)  # (L, P)
    for batch in loader:
        images = batch["image"].to(device)
        _check_volume_size(images, mcfg)
        sum_patch += mae_target(images, mcfg.patch_size, norm_pix_target).sum(dim=0, dtype=torch.float64)
    n_scans = _num_items(dataset)
    gen = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(("model", "model_lung", "base", "base_lung", "n", "n_lung"), 0.0)
    for batch in loader:
        images, lung = batch["image"].to(device), batch["lung_mask"].to(device)
        pred, mask = model(images, mask_ratio=mcfg.mask_ratio, generator=gen)
        target = mae_target(images, mcfg.patch_size, norm_pix_target)
        lung_sel = mask * (lung_fraction_per_patch(lung, mcfg.patch_size) > lung_threshold).float()
        # Leave-one-out: each scan is scored against the average of the OTHER scans, so the baseline never
        # sees the scan it predicts (with one scan there is no other: it is its own average, L1 0).
        if n_scans > 1:
            others = ((sum_patch.unsqueeze(0) - target.double()) / (n_scans - 1)).float()  # (B, L, P)
        else:
            others = target
        l1, base = patch_l1(pred, target), patch_l1(others, target)  # (B, L)
        sums["model"] += (l1 * mask).sum().item()
        sums["base"] += (base * mask).sum().item()
        sums["model_lung"] += (l1 * lung_sel).sum().item()
        sums["base_lung"] += (base * lung_sel).sum().item()
        sums["n"] += mask.sum().item()
        sums["n_lung"] += lung_sel.sum().item()
    model.train(was_training)
    n, n_lung = max(sums["n"], 1.0), max(sums["n_lung"], 1.0)
    return {"l1_masked": sums["model"] / n, "l1_masked_lung": sums["model_lung"] / n_lung,
            "baseline_l1_masked": sums["base"] / n, "baseline_l1_masked_lung": sums["base_lung"] / n_lung,
            "num_examples": _num_items(dataset)}


# ---------------------------------------------------------------------------------------------------------
# Classifier fine-tuning
# ---------------------------------------------------------------------------------------------------------


def _labels_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["label"]
    if (labels < 0).any():
        raise DatasetError("Unable to train or evaluate the classifier as the dataset holds unlabelled scans "
                           "(label -1); load it with labelled_only=True")
    return labels.long()


def _needs_mask(model: nn.Module) -> bool:
    return bool(getattr(model, "needs_lung_mask", False))


def _lung_mask_of(batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    """The batch's lung masks; a clear error when ``lung`` pooling needs them and the dataset has none."""
    if "lung_mask" in batch:
        return batch["lung_mask"]
    if _needs_mask(model):
        raise DatasetError("Unable to pool over the lungs as the dataset's items have no 'lung_mask'; use a "
                           "cache from `lungmae site prepare` or pooling 'mean'")
    return batch["image"][:, :1]


def train_classifier(model: nn.Module, dataset: Dataset[Any], cfg: TrainConfig, *, class_weights: torch.Tensor | None,
                     **run: Unpack[LocalRun]) -> dict[str, float | int]:
    """Fine-tune an :class:`~lungmae_core.heads.ILDClassifier` (full or linear probe) for one phase.

    Class-weighted cross-entropy (weights from the training split, :func:`class_weights_from_labels`),
    optional label smoothing and mixup; image augmentation as in pretraining. ``cfg.finetune_mode`` decides
    which parameters train (:func:`~lungmae_core.heads.set_trainable`). Under DP the loss is the mean of
    per-sample weighted losses (each sample's gradient depends on that sample only) and mixup is refused.

    Args:
        model: the classifier, trained in place. dataset: labelled items (``label`` >= 0).
        cfg: hyperparameters (``TrainConfig.finetune_defaults()``).
        class_weights: (K,) float or ``None`` for unweighted cross-entropy.
        run: device, seed, privacy, lr_schedule, progress, proximal_mu, optimizer_state (:class:`LocalRun`).

    Returns:
        ``CLASSIFIER_TRAIN_KEYS``: mean ``loss``, running training ``accuracy``, ``num_examples``,
        ``num_steps``, ``lr_last``, ``seconds``.

    Raises:
        NonFiniteLossError, DatasetError: as in :func:`train_mae`; DatasetError also for unlabelled items.
        ConfigError: for mixup under DP.
    """
    if run.get("privacy") is not None and cfg.mixup_alpha > 0:
        raise ConfigError("mixup_alpha must be 0 under DP-SGD: mixup blends scans, so a gradient would no "
                          "longer belong to one scan")
    core, mcfg = _core(model), _model_config(model)
    set_trainable(core, cfg.finetune_mode)  # type: ignore[arg-type]
    loop = _Loop(model, dataset, cfg, desc="finetune", **run)
    device = loop.device
    weights = None if class_weights is None else class_weights.to(device=device, dtype=torch.float32)
    aug_gen = torch.Generator().manual_seed(loop.seed + 1)
    rng = np.random.default_rng(loop.seed + 3)
    loss_sum, correct, seen = 0.0, 0, 0
    for batch in loop.batches():
        images, labels = batch["image"], _labels_of(batch)
        _check_volume_size(images, mcfg)
        images, masks = random_flip_rot90_batch(images, _lung_mask_of(batch, core), aug_gen, cfg.flip_p,
                                                cfg.rot90_p, cfg.flip_axes)
        lam, partner = 1.0, labels
        if cfg.mixup_alpha > 0:
            lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            perm = torch.as_tensor(rng.permutation(images.shape[0]), device=device)
            images, partner = lam * images + (1 - lam) * images[perm], labels[perm]
            masks = torch.maximum(masks, masks[perm])
        with loop.autocast:
            logits = loop.model(images, masks) if _needs_mask(core) else loop.model(images)
        logits = logits.float()
        if loop.privacy is not None:
            per_sample = F.cross_entropy(logits, labels, weight=weights, reduction="none",
                                         label_smoothing=cfg.label_smoothing)
            loss = per_sample.mean()
        else:
            loss = lam * F.cross_entropy(logits, labels, weight=weights, label_smoothing=cfg.label_smoothing)
            if lam < 1.0:
                loss = loss + (1 - lam) * F.cross_entropy(logits, partner, weight=weights,
                                                          label_smoothing=cfg.label_smoothing)
        loop.backward_step(loss)
        n = images.shape[0]
        seen += n
        loss_sum += loss.item() * n
        correct += int((logits.argmax(dim=1) == labels).sum())
    seconds = loop.close()
    result = {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
              "num_examples": _num_items(dataset), "num_steps": loop.step, "lr_last": loop.lr, "seconds": seconds}
    logger.info("finetune (%s): %d steps, loss %.4f, train accuracy %.3f, %.1f s", cfg.finetune_mode, loop.step,
                result["loss"], result["accuracy"], seconds)
    return result


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Dataset[Any], *, num_classes: int,
                        device: str | torch.device = "cpu", batch_size: int = 4) -> dict[str, Any]:
    """Classify every item and score it (:func:`~lungmae_core.metrics.classification_metrics`).

    Args:
        model: an ``ILDClassifier``. dataset: labelled items. num_classes: K.
        device: as in :class:`LocalRun`. batch_size: volumes per forward pass.

    Returns:
        ``CLASSIFICATION_KEYS`` plus ``loss`` (unweighted mean cross-entropy) and ``num_examples``.

    Raises:
        DatasetError: when the dataset is empty or holds unlabelled items.
    """
    device = _as_device(device)
    if _num_items(dataset) == 0:
        raise DatasetError("Unable to evaluate the classifier as the dataset is empty")
    was_training = model.training
    model.to(device).eval()
    labels, probs, loss_sum = [], [], 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        y = _labels_of(batch).to(device)
        images = batch["image"].to(device)
        if _needs_mask(_core(model)):
            logits = model(images, _lung_mask_of(batch, _core(model)).to(device)).float()
        else:
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        labels.append(y.cpu())
        probs.append(logits.softmax(dim=1).cpu())
    model.train(was_training)
    y_all = torch.cat(labels).numpy()
    result: dict[str, Any] = classification_metrics(y_all, torch.cat(probs).numpy(), num_classes)
    result.update(loss=loss_sum / len(y_all), num_examples=len(y_all))
    return result
