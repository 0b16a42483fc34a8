"""The site's policy check: every coordinator request is compared with ``site.yaml``'s ``policy`` before any work.

The round config is a request. Before the site loads a scan or allocates a model it checks the requested
model name and size, image size, batch size, local epochs, rounds and evaluations per run, the evaluation
split, (under DP) that no unnoised training metric is asked for, and that a cross-site request for a local
model to share (phase ``cross-site``, kind ``train``) has the site's consent (``share-local-model``; scoring
the others' models needs none). A request outside the policy raises
:class:`PolicyRefusal`, whose text names the policy key; the ClientApp sends it as the reply's error and
writes it to the site's log. Nothing else happens at the site.

Counting (rounds and evaluations per run) lives in the run's ``Context.state``, which Flower keeps per run
on the SuperNode across the short-lived ClientApp processes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from lungmae_core.contract import CROSS_SITE, EVALUATE, PRETRAIN, TRAIN, RoundConfig
from lungmae_core.errors import LungMAEError

__all__ = ["PolicyRefusal", "POLICY_REFUSAL_CODE", "Usage", "model_parameters", "check_request",
           "effective_policy"]

log = logging.getLogger(__name__)

#: Flower error code of a policy refusal (privacy refusals use lungmae_core.privacy.PRIVACY_REFUSAL_CODE).
POLICY_REFUSAL_CODE = 4003


class PolicyRefusal(LungMAEError):
    """The site refuses a request: ``key`` is the ``site.yaml`` policy key (or rule) it breaks."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"policy refusal: {key}: {detail}")
        self.key = key
        self.detail = detail


@dataclasses.dataclass
class Usage:
    """What this site has served in the current run (kept in the run's ``Context.state``)."""

    train_rounds: int = 0
    evaluations: int = 0

    RECORD = "lungmae-policy-usage"

    @classmethod
    def load(cls, state: Any) -> Usage:
        record = state.config_records.get(cls.RECORD) if state is not None else None
        if record is None:
            return cls()
        return cls(train_rounds=int(record.get("train-rounds", 0)), evaluations=int(record.get("evaluations", 0)))

    def save(self, state: Any) -> None:
        if state is None:
            return
        from flwr.app import ConfigRecord

        state.config_records[self.RECORD] = ConfigRecord({"train-rounds": self.train_rounds,
                                                          "evaluations": self.evaluations})


def model_parameters(cfg: RoundConfig) -> int:
    """Parameters of the model the request would build, counted on torch's ``meta`` device (no memory).

    Raises:
        PolicyRefusal: ``model-config`` when the model config itself is invalid.
    """
    import torch

    from lungmae_core.config import ModelConfig, from_mapping
    from lungmae_core.errors import ConfigError
    from lungmae_core.heads import ILDClassifier
    from lungmae_core.model import MAE3D

    try:
        mcfg = from_mapping(ModelConfig, cfg.model_config, source="model-config")
        with torch.device("meta"):
            model = MAE3D(mcfg) if cfg.phase == PRETRAIN else ILDClassifier(mcfg, cfg.num_classes, cfg.pooling)
    except (ConfigError, ValueError, TypeError) as exc:
        raise PolicyRefusal("model-config", f"the requested model config is invalid ({exc})") from None
    return sum(p.numel() for p in model.parameters())


def check_request(policy: Any, kind: str, cfg: RoundConfig, *, dp_enabled: bool, usage: Usage,
                  site_name: str = "site") -> None:
    """Refuse a request outside ``policy`` (a ``client.site_config.PolicySection``); count it otherwise.

    Raises:
        PolicyRefusal: naming the policy key, the requested value and the site's limit.
    """
    def refuse(key: str, detail: str) -> None:
        exc = PolicyRefusal(key, detail)
        log.warning("site %s refuses the %s request of round %d: %s", site_name, kind, cfg.server_round, exc)
        raise exc

    if cfg.model_name not in policy.allowed_models:
        refuse("policy.allowed-models", f"model {cfg.model_name!r} is not allowed "
                                        f"(allowed: {', '.join(policy.allowed_models)})")
    size = cfg.model_config.get("img-size", cfg.model_config.get("img_size"))
    if not isinstance(size, int) or isinstance(size, bool) or size > policy.max_image_size:
        refuse("policy.max-image-size", f"image size {size!r} exceeds {policy.max_image_size}")
    if cfg.batch_size > policy.max_batch_size:
        refuse("policy.max-batch-size", f"batch size {cfg.batch_size} exceeds {policy.max_batch_size}")
    if kind == TRAIN:
        if cfg.phase == CROSS_SITE and not policy.share_local_model:
            refuse("policy.share-local-model", "this site does not share a locally fine-tuned model for the "
                                               "cross-site matrix (it still scores the others' models)")
        if cfg.local_epochs > policy.max_local_epochs:
            refuse("policy.max-local-epochs", f"{cfg.local_epochs} local epochs exceed {policy.max_local_epochs}")
        if usage.train_rounds >= policy.max_rounds_per_run:
            refuse("policy.max-rounds-per-run", f"this site already trained {usage.train_rounds} rounds in this "
                                                f"run (limit {policy.max_rounds_per_run})")
        if dp_enabled and cfg.train_metrics == "required":
            refuse("privacy.enabled", "under DP the site does not release unnoised training loss or accuracy")
    if kind == EVALUATE:
        if cfg.split not in policy.evaluation_splits:
            refuse("policy.evaluation-splits", f"split {cfg.split!r} is not allowed "
                                               f"(allowed: {', '.join(policy.evaluation_splits)})")
        if usage.evaluations >= policy.max_evaluations_per_run:
            refuse("policy.max-evaluations-per-run", f"this site already served {usage.evaluations} evaluations "
                                                     f"in this run (limit {policy.max_evaluations_per_run})")
    params = model_parameters(cfg)
    if params > policy.max_parameters:
        refuse("policy.max-parameters", f"the requested model has {params:,} parameters; the limit is "
                                        f"{policy.max_parameters:,}")
    if kind == TRAIN:
        usage.train_rounds += 1
    elif kind == EVALUATE:
        usage.evaluations += 1


def effective_policy(site: Any) -> dict[str, Any]:
    """The policy as the site enforces it, for ``lungmae site policy`` (plus the fixed DP rule)."""
    from lungmae_core.config import to_mapping

    out = to_mapping(site.policy)
    out["dp-releases"] = ("under DP (privacy.enabled true): the noised update and evaluation figures only; "
                          "no training loss or accuracy" if site.privacy.enabled else
                          "DP disabled: training loss and accuracy are released with each update")
    return out
