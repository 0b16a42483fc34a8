"""Differential privacy for local training: DP-SGD with Opacus, round planning and privacy accounting.

A site trains each round with DP-SGD: every step draws a Poisson sample of its pseudonymous patients (each
joins the batch independently with probability ``q`` and brings one of its scans), clips each patient's
gradient to L2 norm ``C`` (``max_grad_norm``), sums them, adds Gaussian noise of standard deviation
``sigma * C`` drawn from a generator seeded from the OS (never from the round config) and steps the
optimizer. The privacy loss of ``T`` such steps is ``(sigma, q, T)``; the RDP accountant composes the rounds
of both phases into one ``(epsilon, delta)`` that the site's ledger compares with its budget.

This module is framework-free (no ``flwr``): :class:`DPConfig` is the ``privacy`` section of ``site.yaml``,
:func:`plan_round` says what a round will cost before it runs, and :class:`OpacusPrivacy`
(``lungmae_core.dp_opacus``, re-exported here with the secret generators and patient sampling of
``lungmae_core.dp_sampling``) implements ``lungmae_core.train.PrivacyHook`` so that ``train_mae`` /
``train_classifier`` run DP-SGD unchanged.

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch

from lungmae_core.config import check
from lungmae_core.dp_opacus import (
    ACCOUNTANT,
    GRAD_SAMPLE_MODES,
    DPIncompatibleModelError,
    OpacusPrivacy,
    RoundPlan,
    dp_problems,
    is_empty_batch,
    register_grad_samplers,
)
from lungmae_core.dp_sampling import (
    PRIVACY_UNIT,
    PatientSampled,
    count_patients,
    patient_ids_of,
    secure_generator,
    secure_seed,
)
from lungmae_core.errors import ConfigError

__all__ = [
    "secure_seed",
    "secure_generator",
    "PRIVACY_UNIT",
    "PatientSampled",
    "count_patients",
    "check_delta",
    "PRETRAIN_CLIP",
    "FINETUNE_CLIP",
    "DEFAULT_DP_FINETUNE",
    "patient_ids_of",
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


#: Flower error code of a train reply in which the site refuses a round to protect its privacy budget
#: (or because it cannot meet the federation's privacy requirement). Codes below 100 are Flower's own.
PRIVACY_REFUSAL_CODE = 4001
#: Every refusal reason starts with this, so the server can tell a refusal from a crash.
PRIVACY_REFUSAL_PREFIX = "privacy-refusal:"


#: Clipping bound of DP pretraining, from per-sample gradient norms of the tiny MAE's voxel loss measured on
#: the built-in phantoms (``benchmarks/dp_utility.py --measure-norms``; docs/privacy.md "Clipping bounds"):
#: median 0.221 at initialisation, 0.161 after 20 epochs. The old 0.005 clipped every sample ~45x.
PRETRAIN_CLIP = 0.2
#: Clipping bound of DP fine-tuning, measured the same way: per-patient norms of the class-weighted
#: cross-entropy with the pretrained encoder and a new head are 11.2 / 12.4 / 12.9 (p10 / median / p90),
#: dominated by the head in every trainable mode; 10 keeps ~80% of a typical sample at the start, and
#: samples the head already classifies fall under it.
FINETUNE_CLIP = 10.0
#: What DP fine-tuning trains unless site.yaml says otherwise (``privacy.finetune-trainable``).
DEFAULT_DP_FINETUNE = "linear-probe"


#: Message config keys by which the server states the federation's privacy requirement in every train round
#: (``federation.yaml`` ``privacy``); the site enforces them (``client/privacy_gate.py``).
REQUIRE_DP_KEY = "require-dp"
MAX_EPSILON_PER_ROUND_KEY = "max-epsilon-per-round"


def is_privacy_refusal(reason: str | None) -> bool:
    """True when an error reply's reason is a site's privacy refusal (not a crash); for the server."""
    return bool(reason) and str(reason).lstrip().startswith(PRIVACY_REFUSAL_PREFIX)


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """The ``privacy`` section of ``site.yaml``: whether this site trains with DP-SGD and its total budget.

    The site's data protection officer signs off on ``(epsilon, delta)``: the most this site will ever
    spend on the consortium, across rounds, both phases and restarts (enforced by ``client/ledger.py``).

    Args:
        enabled: train with DP-SGD. Defaults to False (the site then reports ``epsilon`` 0.0 and a
            federation that requires DP excludes it).
        epsilon: total budget ``epsilon`` (> 0); required when ``enabled``.
        delta: total budget ``delta`` in (0, 1). ``None`` (default): ``min(1e-5, 1 / (10 N))`` for the site's
            ``N`` training patients, fixed in the ledger the first time it is used; a delta above ``1 / N`` is
            refused (:func:`check_delta`).
        max_grad_norm: per-patient gradient clipping bound ``C`` (L2) of classifier fine-tuning. Defaults to
            ``FINETUNE_CLIP`` (10), just under the per-sample gradient norms measured on the built-in phantoms
            (median 12.4; ``docs/privacy.md``, "Clipping bounds").
        pretrain_max_grad_norm: ``C`` of MAE pretraining. Defaults to ``PRETRAIN_CLIP`` (0.2), between the
            measured medians of the tiny MAE on the phantoms (0.22 at initialisation, 0.16 after pretraining): a
            bound far below the real norms clips every sample to a sliver of its signal, one far above adds
            noise (``sigma * C``) for nothing.
        finetune_trainable: what DP fine-tuning trains, whatever the server asks (the site decides):
            ``"linear-probe"`` (head, its norm, CLS token), ``"last-K"`` (those plus the last ``K`` encoder
            blocks and the encoder's final norm) or ``"full"``. The server's request is narrowed to this, never
            widened. Defaults to ``DEFAULT_DP_FINETUNE``: under noise a few thousand parameters learn where
            millions cannot (the noise grows with the square root of the trained dimension).
        noise_multiplier: ``sigma``, the noise standard deviation relative to ``C``; give this or
            ``target_epsilon_per_round``, not both.
        target_epsilon_per_round: derive ``sigma`` so that one round alone costs at most this epsilon
            (at ``delta``); rounds compose to less than the sum of their epsilons.
        ledger: the ledger file. ``None``: ``<state-dir>/privacy-ledger.json`` (``site.yaml`` ``site:
            state-dir``, which defaults to a ``state`` folder beside site.yaml, never inside the cache).
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
    max_grad_norm: float = FINETUNE_CLIP
    pretrain_max_grad_norm: float = PRETRAIN_CLIP
    noise_multiplier: float | None = None
    target_epsilon_per_round: float | None = None
    ledger: Path | None = None
    grad_sample_mode: Literal["hooks", "functorch", "bookkeeping"] = "hooks"
    finetune_trainable: str = DEFAULT_DP_FINETUNE

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
        from lungmae_core.heads import parse_finetune_mode

        parse_finetune_mode(self.finetune_trainable, key="finetune-trainable")
        if not self.enabled:
            return
        check(self.epsilon is not None,
              "epsilon (the site's total privacy budget) is required when enabled is true")
        check(self.noise_multiplier is not None or self.target_epsilon_per_round is not None,
              "noise-multiplier or target-epsilon-per-round is required when enabled is true "
              "(how much noise each DP-SGD step adds)")
        if self.target_epsilon_per_round is not None and self.epsilon is not None:  # (epsilon: checked above)
            check(self.target_epsilon_per_round <= self.epsilon,
                  f"target-epsilon-per-round {self.target_epsilon_per_round} must not exceed the total "
                  f"epsilon {self.epsilon}")

    def clip_for(self, phase: str) -> float:
        """The clipping bound ``C`` of a phase: ``pretrain_max_grad_norm`` for ``"pretrain"``, else
        ``max_grad_norm``."""
        return float(self.pretrain_max_grad_norm if phase == "pretrain" else self.max_grad_norm)


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


def default_delta(num_patients: int) -> float:
    """``min(1e-5, 1 / (10 N))`` for ``N`` patients: the usual 1e-5, and always well below ``1 / N``.

    ``delta`` bounds the probability that the guarantee fails outright; above ``1 / N`` a mechanism that
    publishes one random patient's record whole would satisfy it, so it must sit far below ``1 / N``
    (:func:`check_delta` refuses anything above).

    Examples:
        >>> default_delta(100), default_delta(1_000_000)
        (1e-05, 1e-07)
    """
    if num_patients < 1:
        raise ValueError(f"num_patients must be >= 1 to derive delta; got {num_patients}")
    return min(1e-5, 1.0 / (10.0 * num_patients))


def check_delta(delta: float, num_patients: int, *, source: str = "site.yaml privacy.delta") -> None:
    """Refuse a ``delta`` above ``1 / N`` for the site's ``N`` patients (it would permit a full leak).

    Raises:
        ConfigError: naming where delta came from, its value, ``1 / N`` and the default.
    """
    if num_patients >= 1 and delta > 1.0 / num_patients:
        raise ConfigError(
            f"Unable to use delta {delta:g} ({source}) as it is above 1/N = {1.0 / num_patients:.3g} for this site's "
            f"{num_patients} patients: such a delta allows one patient's data to be released outright. Use "
            f"at most {default_delta(num_patients):g} (the default, min(1e-5, 1/(10 N)))")


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
        generator: the noise's source (CPU generator); ``None``: a fresh :func:`secure_generator`. Never
            pass one seeded from the run config: whoever knows the seed could subtract the noise.

    Returns:
        (the noised mean ``{name: tensor}``, each update's norm before clipping).

    Raises:
        ValueError: for no update, ``clip <= 0`` or ``noise_multiplier <= 0``.
    """
    if not updates:
        raise ValueError("central DP needs at least one update to aggregate")
    if clip <= 0 or noise_multiplier <= 0:
        raise ValueError(f"central DP needs clip > 0 and noise_multiplier > 0; got {clip} and {noise_multiplier}")
    if generator is None:
        generator = secure_generator()
    names = list(updates[0])
    zero = torch.zeros((), dtype=torch.float64)
    norms = [float(torch.sqrt(sum(((u[k].double() ** 2).sum() for k in names), zero))) for u in updates]
    n = len(updates)
    out: dict[str, torch.Tensor] = {}
    for k in names:
        ref = updates[0][k]
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for u, norm in zip(updates, norms, strict=True):
            total += u[k].double().cpu() * min(1.0, clip / (norm + 1e-12))
        noise = torch.randn(ref.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * clip)
        out[k] = ((total + noise) / n).to(ref.dtype)
    return out, norms


def central_dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Site-level epsilon of ``releases`` noised aggregates (no sampling amplification is claimed: q = 1)."""
    return epsilon_for([(noise_multiplier, 1.0, releases)], delta)
