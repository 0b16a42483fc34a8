"""Between the ClientApp and the ledger: plan a round, check it against budget and federation, train, settle.

The ClientApp wraps local training in :meth:`PrivacyGate.round`::

    gate = PrivacyGate.for_site_config(site)          # ledger in the site's state-dir, delta from N patients
    with gate.round(phase="pretrain", server_round=3, dataset=train_set, batch_size=8, epochs=1,
                    requirement=PrivacyRequirement.from_config(msg_config), run=str(run_id)) as privacy:
        metrics = train_mae(model, train_set, cfg, device=..., seed=..., privacy=privacy)
    reply with gate.epsilon_spent()

The unit of accounting is the pseudonymous patient: the round's sample rate and the ledger count patients
(``lungmae_core.privacy.PatientSampled``). Nothing the server sends seeds the DP randomness: the hook draws
its generators from the OS when training starts.

Entering the block reserves the round's full planned cost in the ledger (or raises a refusal: the budget
would be exceeded, or the federation requires DP / a smaller per-round epsilon than this site offers);
leaving it settles the steps really taken. Both happen before the reply exists, so the weights never leave
the site before their privacy cost is on disk. :func:`refusal_reason` turns a refusal into the text of the
error reply the server logs (it starts with ``PRIVACY_REFUSAL_PREFIX``; the code is
``PRIVACY_REFUSAL_CODE``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from client.ledger import PrivacyLedger
from lungmae_core.atomic import atomic_write_json
from lungmae_core.errors import ConfigError, LungMAEError
from lungmae_core.privacy import (
    MAX_EPSILON_PER_ROUND_KEY,
    PRIVACY_REFUSAL_PREFIX,
    PRIVACY_UNIT,
    REQUIRE_DP_KEY,
    DPConfig,
    OpacusPrivacy,
    RoundPlan,
    check_delta,
    count_patients,
    default_delta,
    is_privacy_refusal,
    patient_ids_of,
    plan_round,
)

__all__ = ["PrivacyRequirementNotMet", "PrivacyRequirement", "PrivacyGate", "refusal_reason", "is_refusal",
           "REQUIRE_DP_KEY", "MAX_EPSILON_PER_ROUND_KEY", "WITNESS_NAME", "training_patients"]

logger = logging.getLogger(__name__)

#: A marker the gate leaves in the cache once DP work started: if the whole state folder is lost but the cache
#: is not, the site still refuses DP until an explicit ledger reset.
WITNESS_NAME = "dp-witness.json"


def training_patients(cache: str | Path | None) -> int:
    """Distinct patients of the cache's accepted training scans (both phases train on the train split).

    Raises:
        ConfigError: when the cache has no manifest (the site must be prepared first).
    """
    from lungmae_core.manifest import read_manifest

    if cache is None or not (Path(cache) / "manifest.csv").is_file():
        raise ConfigError(f"Unable to count the site's patients for the DP delta as the cache {cache} has no "
                          "manifest.csv; run `lungmae site prepare` first")
    return count_patients(r.patient_id for r in read_manifest(cache) if r.accepted and r.split == "train")


class PrivacyRequirementNotMet(LungMAEError):
    """The federation requires more privacy than this site's settings give (DP off, or too little noise)."""


@dataclasses.dataclass(frozen=True)
class PrivacyRequirement:
    """What the federation requires of every site this round (from ``federation.yaml`` ``privacy``).

    Args:
        require_dp: the site must train with DP-SGD.
        max_epsilon_per_round: the largest epsilon one round may cost (at the site's delta); 0: no limit.
    """

    require_dp: bool = False
    max_epsilon_per_round: float = 0.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrivacyRequirement:
        """Read the requirement from a received message config; absent keys mean no requirement."""
        require = config.get(REQUIRE_DP_KEY, False)
        limit = config.get(MAX_EPSILON_PER_ROUND_KEY, 0.0)
        if not isinstance(require, (bool, int)) or isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise PrivacyRequirementNotMet(
                f"Unable to read the federation's privacy requirement as {REQUIRE_DP_KEY!r} is {require!r} and "
                f"{MAX_EPSILON_PER_ROUND_KEY!r} is {limit!r}; expected a bool and a number")
        return cls(require_dp=bool(require), max_epsilon_per_round=float(limit))

    def to_config(self) -> dict[str, Any]:
        """The message config entries the server sends (plain bool and float)."""
        return {REQUIRE_DP_KEY: self.require_dp, MAX_EPSILON_PER_ROUND_KEY: self.max_epsilon_per_round}


def refusal_reason(exc: BaseException) -> str:
    """The error-reply text of a refusal: ``"privacy-refusal: <why>"`` (no data, no paths)."""
    return f"{PRIVACY_REFUSAL_PREFIX} {exc}"


def is_refusal(reason: str | None) -> bool:
    """True when an error reply's reason is a privacy refusal (not a crash)."""
    return is_privacy_refusal(reason)


class PrivacyGate:
    """A site's DP settings plus its ledger: plans each round, refuses what the budget cannot pay.

    Args:
        cfg: the ``privacy`` section of ``site.yaml``.
        ledger: the site's ledger; ``None`` when DP is disabled.
        site: the site's name (for log lines).
    """

    def __init__(self, cfg: DPConfig, ledger: PrivacyLedger | None, site: str = "",
                 witness: Path | None = None) -> None:
        if cfg.enabled and ledger is None:
            raise ValueError("a PrivacyGate with DP enabled needs a ledger")
        self.cfg, self.ledger, self.site, self.witness = cfg, ledger, site, witness

    @classmethod
    def for_site(cls, cfg: DPConfig, *, ledger_path: str | Path | None, num_patients: int, site: str = "",
                 witness: Path | None = None) -> PrivacyGate:
        """The gate of a site: opens (or prepares) its ledger when DP is enabled.

        Args:
            cfg: ``site.yaml`` privacy settings.
            ledger_path: the ledger file (``cfg.ledger`` resolved by the site config, in the state folder).
            num_patients: ``N``, the patients this site trains on; the default delta is
                ``min(1e-5, 1 / (10 N))`` and a delta above ``1 / N`` is refused.
            site: the site's name.
            witness: a marker file outside the state folder (in the cache) whose existence proves earlier DP work.

        Raises:
            LedgerError: when an existing ledger is unreadable or states another delta.
            ConfigError: when the delta (site.yaml's or the ledger's) is above ``1 / N``.
        """
        if not cfg.enabled:
            return cls(cfg, None, site)
        if ledger_path is None:
            raise ValueError("privacy is enabled but no ledger path was given")
        if cfg.delta is not None:
            check_delta(cfg.delta, num_patients)
        witnesses = [witness] if witness is not None else []
        ledger = PrivacyLedger(ledger_path, budget_epsilon=float(cfg.epsilon or 0.0), delta=cfg.delta, site=site,
                               witnesses=witnesses)
        if ledger.delta is None:  # new ledger, delta from the data
            ledger = PrivacyLedger(ledger_path, budget_epsilon=float(cfg.epsilon or 0.0),
                                   delta=default_delta(max(1, num_patients)), site=site, witnesses=witnesses)
        else:
            check_delta(ledger.delta, num_patients, source=f"the privacy ledger {ledger.path}")
        return cls(cfg, ledger, site, witness)

    @classmethod
    def for_site_config(cls, site_cfg: Any) -> PrivacyGate:
        """The gate of a loaded ``site.yaml`` (``client.site_config.SiteConfig``); cheap when DP is disabled.

        The ledger is ``privacy.ledger`` (default ``<state-dir>/privacy-ledger.json``), ``N`` the distinct
        patients of the cache's training scans, and the cache keeps a witness of DP work.
        """
        cfg: DPConfig = site_cfg.privacy
        if not cfg.enabled:
            return cls(cfg, None, site_cfg.site.name)
        cache = site_cfg.data.cache
        ledger = cfg.ledger if cfg.ledger is not None else Path(site_cfg.site.state_dir) / "privacy-ledger.json"
        return cls.for_site(cfg, ledger_path=ledger, num_patients=training_patients(cache),
                            site=site_cfg.site.name, witness=None if cache is None else Path(cache) / WITNESS_NAME)

    def _leave_witness(self) -> None:
        if self.witness is None or self.witness.exists() or self.ledger is None:
            return
        try:
            atomic_write_json(self.witness, {"what": "this site has trained with DP; its privacy ledger is kept at",
                                             "ledger": str(self.ledger.path)}, mode=0o600)
        except OSError as exc:  # the journal beside the ledger is the primary evidence; this is a second one
            logger.warning("Unable to leave the DP witness %s: %s", self.witness, exc)

    @property
    def enabled(self) -> bool:
        """Whether this site trains with DP-SGD."""
        return self.cfg.enabled

    def epsilon_spent(self) -> float:
        """The site's total epsilon so far, the one number every reply carries (0.0 without DP)."""
        return 0.0 if self.ledger is None else self.ledger.epsilon_spent()

    def plan(self, *, phase: str, num_samples: int, batch_size: int, epochs: int,
             max_steps: int | None = None) -> RoundPlan:
        """The plan of a round (noise, sample rate, steps, its own epsilon) without recording anything."""
        assert self.ledger is not None and self.ledger.delta is not None
        return plan_round(self.cfg, num_samples=num_samples, batch_size=batch_size, epochs=epochs,
                          delta=self.ledger.delta, max_steps=max_steps, phase=phase)

    def check_requirement(self, requirement: PrivacyRequirement, plan: RoundPlan | None) -> None:
        """Raise :class:`PrivacyRequirementNotMet` when this round would not meet the federation's requirement."""
        if plan is None:
            if requirement.require_dp or requirement.max_epsilon_per_round > 0:
                raise PrivacyRequirementNotMet(
                    "Unable to train as the federation requires differential privacy and this site has "
                    "privacy.enabled false in site.yaml")
            return
        limit = requirement.max_epsilon_per_round
        if limit > 0 and plan.epsilon_round > limit:
            raise PrivacyRequirementNotMet(
                f"Unable to train as this round would cost epsilon {plan.epsilon_round:.3f} (noise multiplier "
                f"{plan.noise_multiplier:.3g}, {plan.steps} steps at sample rate {plan.sample_rate:.3g}), over "
                f"the federation's limit of {limit:g} per round; raise privacy.noise-multiplier or set "
                "privacy.target-epsilon-per-round in site.yaml")

    @contextlib.contextmanager
    def round(self, *, phase: str, server_round: int, batch_size: int, epochs: int, dataset: Any = None,
              num_samples: int | None = None, max_steps: int | None = None,
              requirement: PrivacyRequirement = PrivacyRequirement(), run: str = "") -> Iterator[OpacusPrivacy | None]:
        """Reserve the round in the ledger, yield the DP hook to train with, settle the steps taken.

        Yields ``None`` when DP is disabled (and the federation does not require it).

        Args:
            dataset: the scans this round trains on; the plan counts its distinct patients (the unit).
            num_samples: the patient count directly (instead of ``dataset``).
            run: the federation run, recorded in the ledger (``lungmae site ledger show`` groups by it).

        Raises:
            PrivacyBudgetExceeded: the round would exceed the site's budget (recorded as a refusal).
            PrivacyRequirementNotMet: the federation requires DP or a smaller per-round epsilon.
            LedgerError: the ledger cannot be read or written.
        """
        if not self.enabled:
            self.check_requirement(requirement, None)
            yield None
            return
        assert self.ledger is not None
        if num_samples is None:
            ids = patient_ids_of(dataset)
            if ids is None:
                raise ConfigError(f"Unable to plan a DP round as the dataset {type(dataset).__name__} has no patient "
                                  f"ids; the unit of DP accounting is the {PRIVACY_UNIT}")
            num_samples = count_patients(ids)
        plan = self.plan(phase=phase, num_samples=num_samples, batch_size=batch_size, epochs=epochs,
                         max_steps=max_steps)
        self.check_requirement(requirement, plan)
        entry = self.ledger.reserve(plan, phase=phase, server_round=server_round, run=run)
        self._leave_witness()
        privacy = OpacusPrivacy(plan, grad_sample_mode=self.cfg.grad_sample_mode,
                                trainable=self.cfg.finetune_trainable if phase != "pretrain" else None)
        try:
            yield privacy
        finally:
            # Also after a failure: the steps taken until then are what the (unreleased) weights saw.
            settled = self.ledger.settle(entry.id, steps_taken=privacy.steps_taken)
            logger.info("site %s: %s round %d trained %d of %d DP steps; epsilon spent %.3f of %.3f",
                        self.site, phase, server_round, settled.steps, settled.planned_steps,
                        settled.epsilon_total, self.ledger.budget_epsilon)

