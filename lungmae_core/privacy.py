"""Differential privacy for local training: DP-SGD with Opacus, round planning and privacy accounting.

A site trains each round with DP-SGD: every step draws a Poisson sample of its scans (each scan joins the
batch independently with probability ``q``), clips each scan's gradient to L2 norm ``C``
(``max_grad_norm``), sums them, adds Gaussian noise of standard deviation ``sigma * C`` and steps the
optimizer. The privacy loss of ``T`` such steps is ``(sigma, q, T)``; the RDP accountant composes the rounds
of both phases into one ``(epsilon, delta)`` that the site's ledger compares with its budget.

This module is framework-free (no ``flwr``): :class:`DPConfig` is the ``privacy`` section of ``site.yaml``,
:func:`plan_round` says what a round will cost before it runs, and :class:`OpacusPrivacy` implements
``lungmae_core.train.PrivacyHook`` so that ``train_mae`` / ``train_classifier`` run DP-SGD unchanged.

Per-sample gradient mode: Opacus can compute per-sample gradients with module hooks (closed-form grad
samplers per layer type), with ``torch.func`` (vmap over each layer) or avoid them with ghost clipping
(two backward passes, norms only). ``benchmarks/dp_step.py`` measures the three on our models; hooks is the
default because it was the fastest there (see ``docs/privacy.md``) and because it needs nothing from the
training loop, whereas ghost clipping needs a per-sample loss vector and a second backward pass.

References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD).
    Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lungmae_core.config import check
from lungmae_core.errors import ConfigError, LungMAEError

__all__ = [
    "DPConfig",
    "RoundPlan",
    "GRAD_SAMPLE_MODES",
    "PRIVACY_REFUSAL_CODE",
    "PRIVACY_REFUSAL_PREFIX",
    "DPIncompatibleModelError",
    "sample_rate_for",
    "steps_for",
    "default_delta",
    "epsilon_for",
    "noise_for_target_epsilon",
    "plan_round",
    "register_grad_samplers",
    "dp_problems",
    "is_empty_batch",
    "is_privacy_refusal",
    "REQUIRE_DP_KEY",
    "MAX_EPSILON_PER_ROUND_KEY",
    "OpacusPrivacy",
    "central_dp_mean",
    "central_dp_epsilon",
]

logger = logging.getLogger(__name__)

#: Per-sample gradient modes of Opacus that ``OpacusPrivacy`` supports through the ``PrivacyHook`` protocol.
#: ("ghost" clipping is measured in ``benchmarks/dp_step.py`` but needs a per-sample loss and two backward
#: passes inside the training loop, which the hook protocol does not give it.)
# [perf] "bookkeeping": lungmae_core.dp_clipping (clipped sum in one backward pass, no per-sample gradients).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "bookkeeping")

#: Flower error code of a train reply in which the site refuses a round to protect its privacy budget
#: (or because it cannot meet the federation's privacy requirement). Codes below 100 are Flower's own.
PRIVACY_REFUSAL_CODE = 4001
#: Every refusal reason starts with this, so the server can tell a refusal from a crash.
PRIVACY_REFUSAL_PREFIX = "privacy-refusal:"

ACCOUNTANT = "rdp"


#: Message config keys by which the server states the federation's privacy requirement in every train round
#: (``federation.yaml`` ``privacy``); the site enforces them (``client/privacy_gate.py``).
REQUIRE_DP_KEY = "require-dp"
MAX_EPSILON_PER_ROUND_KEY = "max-epsilon-per-round"


def is_privacy_refusal(reason: str | None) -> bool:
    """True when an error reply's reason is a site's privacy refusal (not a crash); for the server."""
    return bool(reason) and str(reason).lstrip().startswith(PRIVACY_REFUSAL_PREFIX)


class DPIncompatibleModelError(LungMAEError, ValueError):
    """The model cannot be trained with DP-SGD as built (a layer without per-sample gradients, BatchNorm...)."""


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """The ``privacy`` section of ``site.yaml``: whether this site trains with DP-SGD and its total budget.

    The site's data protection officer signs off on ``(epsilon, delta)``: the most this site will ever
    spend on the consortium, across rounds, both phases and restarts (enforced by ``client/ledger.py``).

    Args:
        enabled: train with DP-SGD. Defaults to False (the site then reports ``epsilon`` 0.0 and a
            federation that requires DP excludes it).
        epsilon: total budget ``epsilon`` (> 0); required when ``enabled``.
        delta: total budget ``delta`` in (0, 1). ``None`` (default): ``1 / (10 * N)`` for the site's ``N``
            training scans, fixed in the ledger the first time it is used.
        max_grad_norm: per-sample gradient clipping bound ``C`` (L2) of classifier fine-tuning. Defaults to
            1.0 (per-sample gradient norms of the tiny classifier start near 15, so most are clipped).
        pretrain_max_grad_norm: ``C`` of MAE pretraining. Defaults to 0.005: the voxel L1 loss gives
            per-sample gradient norms near 0.003 at the start, and a bound far above the real norms only
            adds noise (the noise is ``sigma * C``) without keeping more signal.
        noise_multiplier: ``sigma``, the noise standard deviation relative to ``C``; give this or
            ``target_epsilon_per_round``, not both.
        target_epsilon_per_round: derive ``sigma`` so that one round alone costs at most this epsilon
            (at ``delta``); rounds compose to less than the sum of their epsilons.
        ledger: the ledger file. ``None``: ``<cache>/privacy-ledger.json`` (set by the site config).
        grad_sample_mode: per-sample gradient mode, ``"hooks"`` (default), ``"functorch"`` or
            ``"bookkeeping"`` (``lungmae_core.dp_clipping``: no per-sample gradients; see docs/performance.md).

    Raises:
        ConfigError: naming the key and the value, e.g. "give either noise-multiplier or
            target-epsilon-per-round, not both".

    Examples:
        >>> DPConfig(enabled=True, epsilon=8.0, noise_multiplier=1.1).max_grad_norm
        1.0
    """

    enabled: bool = False
    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    pretrain_max_grad_norm: float = 0.005
    noise_multiplier: float | None = None
    target_epsilon_per_round: float | None = None
    ledger: Path | None = None
    grad_sample_mode: Literal["hooks", "functorch", "bookkeeping"] = "hooks"  # [perf] bookkeeping

    def __post_init__(self) -> None:
        for key in ("max_grad_norm", "pretrain_max_grad_norm"):
            value = getattr(self, key)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                  f"{key.replace('_', '-')} must be a number > 0; got {value!r}")
        if self.epsilon is not None:
            check(math.isfinite(self.epsilon) and self.epsilon > 0,
                  f"epsilon (the site's total budget) must be a number > 0; got {self.epsilon!r}")
        if self.delta is not None:
            check(0.0 < self.delta < 1.0, f"delta must be in the open range (0, 1); got {self.delta!r}")
        if self.noise_multiplier is not None:
            check(math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0,
                  f"noise-multiplier must be a number > 0; got {self.noise_multiplier!r}")
        if self.target_epsilon_per_round is not None:
            check(math.isfinite(self.target_epsilon_per_round) and self.target_epsilon_per_round > 0,
                  f"target-epsilon-per-round must be a number > 0; got {self.target_epsilon_per_round!r}")
        check(self.noise_multiplier is None or self.target_epsilon_per_round is None,
              "give either noise-multiplier or target-epsilon-per-round, not both; got "
              f"noise-multiplier {self.noise_multiplier} and target-epsilon-per-round "
              f"{self.target_epsilon_per_round}")
        if not self.enabled:
            return
        check(self.epsilon is not None,
              "epsilon (the site's total privacy budget) is required when enabled is true")
        check(self.noise_multiplier is not None or self.target_epsilon_per_round is not None,
              "noise-multiplier or target-epsilon-per-round is required when enabled is true "
              "(how much noise each DP-SGD step adds)")
        if self.target_epsilon_per_round is not None:
            check(self.target_epsilon_per_round <= self.epsilon,
                  f"target-epsilon-per-round {self.target_epsilon_per_round} must not exceed the total "
                  f"epsilon {self.epsilon}")

    def clip_for(self, phase: str) -> float:
        """The clipping bound ``C`` of a phase: ``pretrain_max_grad_norm`` for ``"pretrain"``, else
        ``max_grad_norm``."""
        return float(self.pretrain_max_grad_norm if phase == "pretrain" else self.max_grad_norm)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What one round of DP-SGD will do, fixed before it runs: the ledger records it, Opacus executes it.

    Args:
        noise_multiplier: ``sigma``.
        sample_rate: ``q``, the Poisson probability of each scan joining a step's batch.
        steps: ``T``, optimizer steps this round (the training may stop earlier, never later).
        max_grad_norm: ``C``.
        num_samples: ``N``, the scans of the training set sampled from.
        batch_size: the expected batch ``q * N`` rounded as the plain DataLoader would batch.
        epsilon_round: the round's own epsilon at ``delta``.
        delta: the ``delta`` the epsilons are stated at.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    num_samples: int
    batch_size: int
    epsilon_round: float
    delta: float

    @property
    def history(self) -> tuple[float, float, int]:
        """The Opacus accountant history entry ``(noise_multiplier, sample_rate, steps)`` of this round."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def sample_rate_for(num_samples: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus really uses for a loader of ``batch_size`` over ``num_samples`` items.

    Opacus' ``DPDataLoader.from_data_loader`` samples with ``q = 1 / len(loader)`` where
    ``len(loader) = ceil(N / B)`` (``drop_last=False``), which is not ``B / N`` unless ``B`` divides ``N``.
    The accountant must use the same ``q`` as the sampler, so both come from here.

    Raises:
        ValueError: for ``num_samples < 1`` or ``batch_size < 1``.

    Examples:
        >>> sample_rate_for(10, 4)   # 3 batches per epoch, not 4/10
        0.3333333333333333
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1; got {num_samples} and {batch_size}")
    return 1.0 / math.ceil(num_samples / batch_size)


def steps_for(num_samples: int, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a round as ``lungmae_core.train`` takes them: ``max_steps`` when set, else ``epochs``
    passes of Opacus' Poisson loader.

    An epoch of that loader is ``int(1 / q)`` steps, which is ``ceil(N / B)`` except where floating point
    rounds ``1 / (1 / k)`` below ``k`` (k = 93, 99, ...): then it is one step fewer. Planning from the same
    expression keeps the ledger exact.
    """
    if max_steps is not None:
        return int(max_steps)
    return epochs * int(1 / sample_rate_for(num_samples, batch_size))


def default_delta(num_samples: int) -> float:
    """``1 / (10 N)``: comfortably below ``1 / N``, so no single scan is likely to be exposed outright."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 to derive delta; got {num_samples}")
    return 1.0 / (10.0 * num_samples)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at Opacus' default orders (slow in pure Python, so cached)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    return tuple(float(v) for v in rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                   orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon_for(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` of a composition of DP-SGD runs, each ``(noise_multiplier, sample_rate, steps)``.

    Exactly what Opacus' RDP accountant computes for that history (its ``compute_rdp`` is the per-step RDP
    times the steps, summed over the history, then converted at ``delta``); the per-step RDP of each
    ``(sigma, q)`` is cached, so a ledger of many rounds stays fast. An empty history costs 0.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    entries = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not entries:
        return 0.0
    total = sum(np.array(_rdp_per_step(s, q)) * t for s, q, t in entries)
    eps, _ = rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


def noise_for_target_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 1%) for which ``steps`` steps at ``sample_rate`` cost <= target.

    Raises:
        ConfigError: when no noise multiplier reaches the target (Opacus gives up above sigma ~ 2^20).
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant=ACCOUNTANT,
                                           epsilon_tolerance=0.01))
    except ValueError as exc:
        raise ConfigError(f"Unable to derive a noise multiplier for target-epsilon-per-round {target_epsilon} "
                          f"at delta {delta:g} with {steps} steps at sample rate {sample_rate:.4g}: {exc}") from exc
    return sigma


def plan_round(cfg: DPConfig, *, num_samples: int, batch_size: int, epochs: int, delta: float,
               max_steps: int | None = None, phase: str = "finetune") -> RoundPlan:
    """Fix the noise, sample rate, step count and clipping bound of one DP-SGD round before training it.

    Args:
        cfg: the site's privacy settings (``enabled`` must be true).
        phase: ``"pretrain"`` or ``"finetune"``; picks the clipping bound (:meth:`DPConfig.clip_for`).
        num_samples: ``N``, scans in this phase's training set.
        batch_size: the training batch size ``B`` (the expected Poisson batch is about ``N / ceil(N / B)``).
        epochs: local epochs of the round.
        delta: the ledger's ``delta``.
        max_steps: the training config's step cap, if any.

    Raises:
        ConfigError: when the round has no step or no noise multiplier reaches the per-round target.
    """
    check(cfg.enabled, "plan_round needs privacy enabled")
    if num_samples < 1:
        raise ConfigError("Unable to plan a DP round as the training set is empty")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"Unable to plan a DP round with epochs {epochs} and batch size {batch_size}; "
                          "both must be >= 1")
    q = sample_rate_for(num_samples, batch_size)
    steps = steps_for(num_samples, batch_size, epochs, max_steps)
    if steps < 1:
        raise ConfigError(f"Unable to plan a DP round of {steps} steps (max-steps {max_steps})")
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        assert cfg.target_epsilon_per_round is not None
        sigma = noise_for_target_epsilon(cfg.target_epsilon_per_round, delta, q, steps)
    return RoundPlan(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=cfg.clip_for(phase),
                     num_samples=int(num_samples), batch_size=int(batch_size),
                     epsilon_round=epsilon_for([(sigma, q, steps)], delta), delta=float(delta))


# --------------------------------------------------------------------------------------------------------
# Opacus: per-sample gradients for our token modules, compatibility checks, the PrivacyHook.
# --------------------------------------------------------------------------------------------------------

_REGISTERED = False


def register_grad_samplers() -> None:
    """Teach Opacus the per-sample gradients (and norms, for ghost clipping) of our bare-tensor modules.

    ``LearnedPositionEmbedding.forward(x) = x + weight`` with ``weight: (1, L, E)``: the per-sample gradient
    of ``weight`` is the output gradient of that sample, ``backprops: (B, L, E) -> (B, 1, L, E)``.
    ``LearnedToken.forward(x) = weight.expand(B, 1, E)``: likewise ``(B, 1, E) -> (B, 1, 1, E)``.
    Without these Opacus would fall back to ``torch.func`` for them, which works but is slower. Idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

    from lungmae_core.model import LearnedPositionEmbedding, LearnedToken

    @register_grad_sampler([LearnedPositionEmbedding, LearnedToken])
    def _token_grad_sample(module: nn.Module, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        # backprops: (B, L, E) or (B, 1, E), already scaled by Opacus for the loss reduction
        if not module.weight.requires_grad:
            return {}
        return {module.weight: backprops.unsqueeze(1).to(module.weight.dtype)}  # (B, 1, L, E)

    @register_norm_sampler([LearnedPositionEmbedding, LearnedToken])
    def _token_norm_sample(module: nn.Module, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        if not module.weight.requires_grad:
            return {}
        return {module.weight: backprops.reshape(backprops.shape[0], -1).norm(2, dim=1)}  # (B,)

    _REGISTERED = True


def dp_problems(model: nn.Module) -> list[str]:
    """Every reason ``model`` cannot be trained with Opacus per-sample gradients, as readable sentences.

    Opacus' own validator (BatchNorm, plain ``nn.MultiheadAttention``...) plus what it misses: a module
    that owns a trainable parameter directly *and* has submodules (a bare ``cls_token`` on the classifier)
    has no grad sampler, so Opacus would run ``torch.func`` over that whole module and its children, which
    fails on our models; such tensors belong in a ``LearnedToken`` of their own. An empty list means fit.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    register_grad_samplers()
    problems = [str(err) for err in ModuleValidator.validate(model, strict=False)]
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own or type(module) in GradSampleModule.GRAD_SAMPLERS:
            continue
        where = name or type(model).__name__
        if any(True for _ in module.children()):
            problems.append(
                f"module '{where}' ({type(module).__name__}) holds trainable parameter(s) {own} beside its "
                "submodules, so Opacus has no per-sample gradient for them; move each into a small module "
                "of its own (lungmae_core.model.LearnedToken / LearnedPositionEmbedding)")
        elif any(True for _ in module.buffers(recurse=False)):
            problems.append(f"module '{where}' ({type(module).__name__}) has buffers and no Opacus grad "
                            "sampler; torch.func cannot compute its per-sample gradients")
    return problems


def _first_tensor_len(batch: Any) -> int | None:
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, dict):
        for value in batch.values():
            n = _first_tensor_len(value)
            if n is not None:
                return n
    if isinstance(batch, (list, tuple)):
        for value in batch:
            n = _first_tensor_len(value)
            if n is not None:
                return n
    return None


def _empty_like(batch: Any) -> Any:
    """The same structure as a collated batch, every tensor cut to zero items along the batch axis."""
    if torch.is_tensor(batch):
        return batch[:0] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch


class _EmptySafeCollate:
    """Collate that returns a zero-length batch of the dataset's own structure when Poisson picks nobody.

    Opacus learns the structure of an empty batch from the first non-empty one and returns a bare list when
    the very first batch is empty; our training loops index batches by key, so the structure is taken from
    one collated example up front instead.
    """

    def __init__(self, collate_fn: Any, example: Any) -> None:
        self.collate_fn = collate_fn
        self.empty = _empty_like(collate_fn([example]))

    def __call__(self, items: list[Any]) -> Any:
        return self.collate_fn(items) if items else self.empty


def is_empty_batch(batch: Any) -> bool:
    """True when a Poisson-sampled batch holds no scan (it must still be a noise-only optimizer step)."""
    return _first_tensor_len(batch) == 0


class OpacusPrivacy:
    """DP-SGD for one round of local training: implements ``lungmae_core.train.PrivacyHook`` with Opacus.

    ``make_private`` wraps the model in Opacus' ``GradSampleModule`` (per-sample gradients), the optimizer in
    a ``DPOptimizer`` (clip each sample to ``C``, add ``N(0, (sigma C)^2)``, divide by the expected batch)
    and replaces the loader by a Poisson one with ``q = 1 / len(loader)``. The round may not take more steps
    than its :class:`RoundPlan` (which the ledger recorded before training): the step after the last planned
    one raises before it updates anything, so the ledger can never under-count.

    Training loops must call ``optimizer.step()`` also for a batch in which Poisson sampling picked nobody
    (see :func:`is_empty_batch`): DP-SGD's guarantee needs that noise-only step. Here a step without any
    per-sample gradient is treated as an empty batch.

    Args:
        plan: the round's noise, sample rate, step cap and clipping bound.
        grad_sample_mode: ``"hooks"`` (default) or ``"functorch"``.
        seed: seeds the Poisson sampler and the noise (reproducible rounds; tests). ``None``: fresh
            randomness from the OS. Either way this is not Opacus' cryptographically secure mode.

    Examples:
        >>> plan = plan_round(DPConfig(enabled=True, epsilon=8, noise_multiplier=1.0),
        ...                   num_samples=8, batch_size=2, epochs=1, delta=1e-3)
        >>> privacy = OpacusPrivacy(plan)
        >>> # train_mae(model, dataset, cfg, device="cpu", seed=0, privacy=privacy)
        >>> # privacy.steps_taken, privacy.history -> what the ledger settles
    """

    def __init__(self, plan: RoundPlan, *, grad_sample_mode: str = "hooks", seed: int | None = None) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"grad-sample-mode must be one of {', '.join(GRAD_SAMPLE_MODES)}; "
                              f"got {grad_sample_mode!r}")
        self.plan = plan
        self.grad_sample_mode = grad_sample_mode
        self.seed = seed
        self.engine: Any = None
        self.optimizer: Any = None
        self.module: Any = None
        self._warned_unused: set[str] = set()

    # -- the PrivacyHook protocol ---------------------------------------------------------------------
    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     loader: torch.utils.data.DataLoader) -> tuple[nn.Module, torch.optim.Optimizer,
                                                                    torch.utils.data.DataLoader]:
        """Return the DP versions of ``(model, optimizer, loader)``; train with those only.

        Raises:
            DPIncompatibleModelError: listing every layer Opacus cannot handle.
            ConfigError: when the loader does not match the plan (another dataset size or batch size),
                which would make the accountant's sample rate differ from the training's.
        """
        from opacus import PrivacyEngine

        if self.engine is not None:
            raise RuntimeError("OpacusPrivacy.make_private was already called; use one hook per round")
        problems = dp_problems(model)
        if problems:
            listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
            raise DPIncompatibleModelError(
                f"Unable to train {type(model).__name__} with DP-SGD as Opacus cannot compute its per-sample "
                f"gradients:\n{listed}")
        n, batch = len(loader.dataset), loader.batch_size
        if n != self.plan.num_samples or batch != self.plan.batch_size or loader.drop_last:
            raise ConfigError(
                f"Unable to apply the DP plan as the loader has {n} samples, batch size {batch} and "
                f"drop_last {loader.drop_last}; the plan was made for {self.plan.num_samples} samples at batch "
                f"size {self.plan.batch_size} without drop_last (the accountant's sample rate would be wrong)")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        noise_gen = sample_gen = None
        if self.seed is not None:
            noise_gen = torch.Generator(device=device).manual_seed(self.seed)
            sample_gen = torch.Generator().manual_seed(self.seed + 1)
        if sample_gen is not None:  # Opacus' Poisson sampler draws from the loader's generator
            loader.generator = sample_gen  # type: ignore[misc]
        # Expected with our models (the input volume and a token's batch-size input need no gradient).
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs", category=UserWarning)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
        if self.grad_sample_mode == "bookkeeping":  # [perf] begin
            from lungmae_core.dp_clipping import make_private_bookkeeping

            module, dp_optimizer, dp_loader = make_private_bookkeeping(
                self.engine, model, optimizer, loader, noise_multiplier=self.plan.noise_multiplier,
                max_grad_norm=self.plan.max_grad_norm, noise_generator=noise_gen)
        else:  # [perf] end
            module, dp_optimizer, dp_loader = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                poisson_sampling=True, grad_sample_mode=self.grad_sample_mode, noise_generator=noise_gen)
        assert dp_loader.sample_rate == self.plan.sample_rate, (dp_loader.sample_rate, self.plan.sample_rate)
        dp_loader.collate_fn = _EmptySafeCollate(loader.collate_fn, loader.dataset[0])
        self._guard_steps(dp_optimizer)
        self.module, self.optimizer = module, dp_optimizer
        logger.info("DP-SGD: sigma %.4g, C %.4g, q %.4g (%d scans, batch %d), at most %d steps, mode %s",
                    self.plan.noise_multiplier, self.plan.max_grad_norm, self.plan.sample_rate, n, batch,
                    self.plan.steps, self.grad_sample_mode)
        return module, dp_optimizer, dp_loader

    def _guard_steps(self, optimizer: Any) -> None:
        """Refuse the step after the planned last one, and let a step without per-sample grads be empty."""
        accountant_hook = optimizer.step_hook
        plan_steps = self.plan.steps

        def guarded_hook(opt: Any) -> None:
            if self.steps_taken >= plan_steps:
                from lungmae_core.errors import PrivacyBudgetExceeded

                raise PrivacyBudgetExceeded(
                    f"Unable to take DP-SGD step {self.steps_taken + 1} as the round's plan, recorded in the "
                    f"privacy ledger before training, allows {plan_steps} steps")
            accountant_hook(opt)

        optimizer.step_hook = guarded_hook
        original_pre_step = optimizer.pre_step

        def pre_step(closure: Any = None) -> Any:
            self._fill_missing_grad_samples(optimizer)
            return original_pre_step(closure)

        optimizer.pre_step = pre_step

    def _fill_missing_grad_samples(self, optimizer: Any) -> None:
        """Zero per-sample gradients for parameters the backward pass did not reach (or for an empty batch)."""
        params = optimizer.params
        if hasattr(optimizer, "clipper"):  # [perf] book-keeping: no per-sample gradients to fill
            return
        have = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
        if len(have) == len(params):
            return
        first = have[0] if have else None
        if isinstance(first, list):
            first = first[0]
        batch = 0 if first is None else int(first.shape[0])
        for p in params:
            if getattr(p, "grad_sample", None) is None:
                if batch and id(p) not in self._warned_unused:
                    self._warned_unused.add(id(p))
                    logger.warning("DP-SGD: a parameter of shape %s got no gradient in this step (unused in "
                                   "forward?); its per-sample gradient is zero and it only receives noise",
                                   tuple(p.shape))
                p.grad_sample = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)

    # -- what the ledger needs after training --------------------------------------------------------
    @property
    def steps_taken(self) -> int:
        """DP-SGD steps actually taken (each one counted by Opacus' accountant)."""
        if self.engine is None:
            return 0
        return sum(int(t) for _, _, t in self.engine.accountant.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus' accountant history of this round: ``[(noise_multiplier, sample_rate, steps)]``."""
        return [] if self.engine is None else [tuple(h) for h in self.engine.accountant.history]

    def epsilon(self, delta: float) -> float:
        """This round's epsilon at ``delta`` from Opacus' own accountant."""
        return 0.0 if self.engine is None else float(self.engine.accountant.get_epsilon(delta=delta))


# --------------------------------------------------------------------------------------------------------
# Central DP: the server clips each site's update and adds Gaussian noise to their mean (site-level DP).
# --------------------------------------------------------------------------------------------------------


def central_dp_mean(updates: Sequence[dict[str, torch.Tensor]], *, clip: float, noise_multiplier: float,
                    generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Equal-weight mean of updates, each clipped to L2 norm ``clip``, plus ``N(0, (sigma clip / n)^2)`` noise.

    The Gaussian mechanism on the sum of clipped site updates, as Flower's
    ``DifferentialPrivacyServerSideFixedClipping``: one site changes the sum by at most ``clip``, so the
    aggregate is site-level DP with noise multiplier ``sigma``. Weights must be equal (a weight by example
    count would let a large site exceed the sensitivity), and robust aggregators (median, trimmed mean) are not
    covered by this analysis.

    Args:
        updates: one ``{name: delta}`` per site, same names and shapes, float tensors.
        clip: the bound ``S`` on each update's global L2 norm (over all its tensors).
        noise_multiplier: ``sigma``.
        generator: the noise's source (CPU generator); ``None``: the global RNG.

    Returns:
        (the noised mean ``{name: tensor}``, each update's norm before clipping).

    Raises:
        ValueError: for no update, ``clip <= 0`` or ``noise_multiplier <= 0``.
    """
    if not updates:
        raise ValueError("central DP needs at least one update to aggregate")
    if clip <= 0 or noise_multiplier <= 0:
        raise ValueError(f"central DP needs clip > 0 and noise_multiplier > 0; got {clip} and {noise_multiplier}")
    names = list(updates[0])
    norms = [float(torch.sqrt(sum((u[k].double() ** 2).sum() for k in names))) for u in updates]
    n = len(updates)
    out: dict[str, torch.Tensor] = {}
    for k in names:
        ref = updates[0][k]
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for u, norm in zip(updates, norms):
            total += u[k].double().cpu() * min(1.0, clip / (norm + 1e-12))
        noise = torch.randn(ref.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * clip)
        out[k] = ((total + noise) / n).to(ref.dtype)
    return out, norms


def central_dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Site-level epsilon of ``releases`` noised aggregates (no sampling amplification is claimed: q = 1)."""
    return epsilon_for([(noise_multiplier, 1.0, releases)], delta)
