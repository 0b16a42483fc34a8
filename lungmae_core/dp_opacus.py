"""Opacus DP-SGD behind ``lungmae_core.train.PrivacyHook``: per-sample gradients for our modules, checks, the hook.

:class:`OpacusPrivacy` wraps a model, optimizer and loader for one round: it samples patients
(``lungmae_core.dp_sampling.PatientSampled``) with a secret Poisson generator, clips each patient's gradient and
adds noise from a second secret generator, and stops the round at its planned step count, the
:class:`RoundPlan` it is given. Re-exported by ``lungmae_core.privacy``, which makes those plans
(``plan_round``) and keeps the accounting; the plan is defined here, by the code that executes it, so that
this module needs nothing from the planner.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from torch import nn

from lungmae_core.dp_sampling import PatientSampled, secure_generator
from lungmae_core.errors import ConfigError, LungMAEError

__all__ = ["GRAD_SAMPLE_MODES", "ACCOUNTANT", "DPIncompatibleModelError", "register_grad_samplers", "dp_problems",
           "is_empty_batch", "OpacusPrivacy", "RoundPlan"]

logger = logging.getLogger(__name__)

#: Per-sample gradient modes of Opacus that ``OpacusPrivacy`` supports through the ``PrivacyHook`` protocol.
#: ("ghost" clipping is measured in ``benchmarks/dp_step.py`` but needs a per-sample loss and two backward
#: passes inside the training loop, which the hook protocol does not give it.)
# "bookkeeping": lungmae_core.dp_clipping (clipped sum in one backward pass, no per-sample gradients).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "bookkeeping")

ACCOUNTANT = "rdp"


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


class DPIncompatibleModelError(LungMAEError, ValueError):
    """The model cannot be trained with DP-SGD as built (a layer without per-sample gradients, BatchNorm...)."""



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

    def _token_grad_sample(module: LearnedPositionEmbedding | LearnedToken, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        # backprops: (B, L, E) or (B, 1, E), already scaled by Opacus for the loss reduction
        if not module.weight.requires_grad:
            return {}
        return {module.weight: backprops.unsqueeze(1).to(module.weight.dtype)}  # (B, 1, L, E)

    def _token_norm_sample(module: LearnedPositionEmbedding | LearnedToken, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        if not module.weight.requires_grad:
            return {}
        return {module.weight: backprops.reshape(backprops.shape[0], -1).norm(2, dim=1)}  # (B,)

    # (called, not used as decorators: opacus is untyped, and a decorator would make the samplers untyped too)
    register_grad_sampler([LearnedPositionEmbedding, LearnedToken])(_token_grad_sample)
    register_norm_sampler([LearnedPositionEmbedding, LearnedToken])(_token_norm_sample)

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
        plan: the round's noise, sample rate, step cap and clipping bound; ``plan.num_samples`` counts
            patients (the unit of accounting, :class:`PatientSampled`).
        grad_sample_mode: ``"hooks"`` (default), ``"functorch"`` or ``"bookkeeping"``
            (``lungmae_core.dp_clipping``: no per-sample gradients; see docs/performance.md).
        trainable: for a classifier, what may train (``"linear-probe"``, ``"last-K"``, ``"full"``); it narrows
            what the training loop unfroze (:func:`lungmae_core.heads.narrow_trainable`). ``None``: leave it.

    The noise and the Poisson sampler draw from generators seeded from the OS's secure source
    (:func:`secure_generator`) inside :meth:`make_private`; nothing a caller passes can seed them, so no
    function of the round config reproduces them.

    Examples:
        >>> plan = plan_round(DPConfig(enabled=True, epsilon=8, noise_multiplier=1.0),
        ...                   num_samples=8, batch_size=2, epochs=1, delta=1e-5)
        >>> privacy = OpacusPrivacy(plan)
        >>> # train_mae(model, dataset, cfg, device="cpu", seed=0, privacy=privacy)
        >>> # privacy.steps_taken, privacy.history -> what the ledger settles
    """

    def __init__(self, plan: RoundPlan, *, grad_sample_mode: str = "hooks", trainable: str | None = None) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"grad-sample-mode must be one of {', '.join(GRAD_SAMPLE_MODES)}; "
                              f"got {grad_sample_mode!r}")
        if trainable is not None:
            from lungmae_core.heads import parse_finetune_mode

            parse_finetune_mode(trainable, key="trainable")
        self.plan = plan
        self.grad_sample_mode = grad_sample_mode
        self.trainable = trainable
        self.engine: Any = None
        self.optimizer: Any = None
        self.module: Any = None
        self.loader: Any = None
        self.noise_generator: torch.Generator | None = None
        self.sample_generator: torch.Generator | None = None
        self._warned_unused: set[int] = set()  # id() of parameters warned about

    # -- the PrivacyHook protocol ---------------------------------------------------------------------
    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     loader: torch.utils.data.DataLoader[Any]) -> tuple[nn.Module, torch.optim.Optimizer,
                                                                         torch.utils.data.DataLoader[Any]]:
        """Return the DP versions of ``(model, optimizer, loader)``; train with those only.

        The returned loader samples patients (:class:`PatientSampled` over ``loader.dataset``), each with
        probability ``q`` per step, from a secret generator; the optimizer clips each patient's gradient and
        adds noise from another secret generator on the model's device.

        Raises:
            DPIncompatibleModelError: listing every layer Opacus cannot handle.
            ConfigError: when the loader does not match the plan (another patient count or batch size),
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
        if self.trainable is not None and hasattr(model, "head"):
            from lungmae_core.heads import narrow_trainable

            kept = narrow_trainable(model, self.trainable)
            logger.info("DP fine-tuning trains %d parameter tensors (%s)", len(kept), self.trainable)
        units = PatientSampled(loader.dataset)
        n, batch, scans = len(units), loader.batch_size, len(units.dataset)
        if n != self.plan.num_samples or batch != self.plan.batch_size or loader.drop_last:
            raise ConfigError(
                f"Unable to apply the DP plan as the loader has {n} patients ({scans} scans), batch "
                f"size {batch} and drop_last {loader.drop_last}; the plan was made for {self.plan.num_samples} "
                f"patients at batch size {self.plan.batch_size} without drop_last (the accountant's sample rate "
                "would be wrong)")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.noise_generator = secure_generator(device)
        self.sample_generator = secure_generator("cpu")
        # Opacus (secure_mode off) builds its Poisson sampler from the loader's own generator and draws the
        # noise from `noise_generator`; both are ours, seeded from the OS. Nothing touches the global RNG.
        loader = torch.utils.data.DataLoader(
            units, batch_size=batch, shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, drop_last=False, generator=self.sample_generator)
        # Expected with our models (the input volume and a token's batch-size input need no gradient).
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs", category=UserWarning)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
        if self.grad_sample_mode == "bookkeeping":
            from lungmae_core.dp_clipping import make_private_bookkeeping

            module, dp_optimizer, dp_loader = make_private_bookkeeping(
                self.engine, model, optimizer, loader, noise_multiplier=self.plan.noise_multiplier,
                max_grad_norm=self.plan.max_grad_norm, noise_generator=self.noise_generator)
        else:
            module, dp_optimizer, dp_loader = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                poisson_sampling=True, grad_sample_mode=self.grad_sample_mode, noise_generator=self.noise_generator)
        assert dp_loader.sample_rate == self.plan.sample_rate, (dp_loader.sample_rate, self.plan.sample_rate)
        if dp_loader.batch_sampler.generator is not self.sample_generator or \
                dp_optimizer.generator is not self.noise_generator:
            raise RuntimeError("Opacus did not take the secret generators (did its PrivacyEngine API change?); "
                               "refusing to train with predictable DP randomness")
        dp_loader.collate_fn = _EmptySafeCollate(loader.collate_fn, units.dataset[0])
        self._guard_steps(dp_optimizer)
        self.module, self.optimizer, self.loader = module, dp_optimizer, dp_loader
        logger.info("DP-SGD: sigma %.4g, C %.4g, q %.4g (%d patients, batch %d), at most %d steps, mode %s",
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
        if hasattr(optimizer, "clipper"):  # book-keeping clipping: no per-sample gradients to fill
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
