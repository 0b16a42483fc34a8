"""``federation.yaml``: the coordinator's typed, validated configuration of a federated run.

The coordinator owns the science of the federation (model, phases, rounds, strategy, checks); sites own
their data and privacy budget (``site.yaml``). Every value here is plain, so the file can be hashed into
checkpoints: a run resumes only under the configuration it was started with.

Examples:
    A minimal file (everything else takes the defaults shown in ``deploy/federation.example.yaml``)::

        model: {name: tiny}
        phases:
          pretrain: {rounds: 3, local-epochs: 2, lr: 1.0e-3, min-sites: 2}
          finetune: {rounds: 4, local-epochs: 4, lr: 1.0e-3, min-sites: 2, mode: full}
        strategy: {name: trimmed-mean, trim: 0.2}
        run-dir: runs/federation
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lungmae_core.config import check, from_mapping, load_yaml, to_mapping
from lungmae_core.contract import DEFAULT_CLASSES, POOLINGS, ContractError, check_class_names
from lungmae_core.errors import FederationConfigError
from lungmae_core.wire import COMPRESSIONS

__all__ = [
    "ModelSection",
    "PhaseConfig",
    "PhasesSection",
    "StrategyConfig",
    "UpdateChecksConfig",
    "PrivacyRequirements",
    "CrossSiteConfig",
    "ServerSection",
    "FederationConfig",
    "DEFAULT_CLASSES",
    "STRATEGIES",
    "load_federation_config",
    "federation_from_mapping",
    "federation_from_run_config",
    "config_hash",
    "federation_to_mapping",
]

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "trimmed-mean", "median")
_E = FederationConfigError


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which named model config (``tiny``, ``paper-p16``, ...) and which of its fields to override.

    Args:
        name: a name in ``lungmae_core.config.MODEL_CONFIGS`` or a path to a model YAML. Defaults to "tiny".
        overrides: ``ModelConfig`` fields to change, e.g. ``{img-size: 32}``.
        pooling: how the classifier pools the encoder's tokens: ``lung`` (lung-weighted mean, default),
            ``mean`` or ``cls``; carried to the sites in every round config.
    """

    name: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    pooling: Literal["lung", "mean", "cls"] = "lung"

    def __post_init__(self) -> None:
        check(bool(self.name), "model name must not be empty (e.g. tiny, paper-p16)", _E)
        check(self.pooling in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}", _E)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One training phase of the schedule.

    Args:
        rounds: federated rounds of this phase (0 skips it).
        local_epochs: epochs each site trains per round.
        lr: peak learning rate of the local optimiser (AdamW with warmup + cosine inside each round).
        fraction: fraction of the eligible sites sampled per round, in (0, 1].
        min_sites: minimum number of eligible sites; fewer valid updates than this skips the round.
        evaluate_every: federated evaluation on the sites' validation split every N rounds (0: never).
        mode: fine-tuning mode, ``full`` or ``linear-probe`` (only meaningful for ``finetune``).
    """

    rounds: int = 1
    local_epochs: int = 1
    lr: float = 1e-3
    fraction: float = 1.0
    min_sites: int = 1
    evaluate_every: int = 1
    mode: Literal["full", "linear-probe"] = "full"

    def __post_init__(self) -> None:
        check(self.rounds >= 0, f"rounds must be >= 0; got {self.rounds}", _E)
        check(self.local_epochs >= 1, f"local-epochs must be >= 1; got {self.local_epochs}", _E)
        check(0 < self.lr < 1, f"lr must be in (0, 1); got {self.lr}", _E)
        check(0 < self.fraction <= 1, f"fraction must be in (0, 1]; got {self.fraction}", _E)
        check(self.min_sites >= 1, f"min-sites must be >= 1; got {self.min_sites}", _E)
        check(self.evaluate_every >= 0, f"evaluate-every must be >= 0; got {self.evaluate_every}", _E)


@dataclasses.dataclass(frozen=True)
class PhasesSection:
    """The two training phases; the hand-off and the final evaluation between/after them have no knobs."""

    pretrain: PhaseConfig = PhaseConfig(rounds=2, local_epochs=1, lr=1e-3, min_sites=1)
    finetune: PhaseConfig = PhaseConfig(rounds=3, local_epochs=3, lr=1e-3, min_sites=1)

    def __post_init__(self) -> None:
        check(self.pretrain.rounds + self.finetune.rounds >= 1,
              "phases: at least one round in pretrain or finetune is needed", _E)


@dataclasses.dataclass(frozen=True)
class CrossSiteConfig:
    """The cross-site evaluation matrix after the final evaluation (``cross-site`` section).

    Each site whose policy has ``share-local-model: true`` fine-tunes a local copy of the final global
    classifier on its own train split and sends it back as an update (checked like a training update); every
    site then scores the global model and each local model on its test split, one evaluate message per
    (model, site). ``metrics.json`` holds the result under ``final.cross_site``.

    Args:
        enabled: run the step. Defaults to true (a site that does not share costs one evaluation per model).
        local_epochs: local fine-tuning epochs of each site's copy. Defaults to 1.
        lr: its peak learning rate; 0 (default): the finetune phase's ``lr``.
    """

    enabled: bool = True
    local_epochs: int = 1
    lr: float = 0.0

    def __post_init__(self) -> None:
        check(self.local_epochs >= 1, f"cross-site local-epochs must be >= 1; got {self.local_epochs}", _E)
        check(0 <= self.lr < 1, f"cross-site lr must be in [0, 1) (0: the finetune lr); got {self.lr}", _E)


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """How valid updates are combined.

    Args:
        name: ``fedavg`` (example-weighted mean), ``fedprox`` (fedavg + proximal term ``mu`` at the
            sites), ``trimmed-mean`` (coordinate-wise mean without the ``trim`` fraction at each end),
            ``median`` (coordinate-wise median).
        mu: FedProx proximal weight, > 0 for ``fedprox``.
        trim: fraction cut at each end by ``trimmed-mean``, in [0, 0.5).
    """

    name: Literal["fedavg", "fedprox", "trimmed-mean", "median"] = "fedavg"
    mu: float = 0.0
    trim: float = 0.2

    def __post_init__(self) -> None:
        check(self.mu >= 0, f"mu must be >= 0; got {self.mu}", _E)
        check(self.name != "fedprox" or self.mu > 0, "mu must be > 0 when the strategy is fedprox", _E)
        check(0 <= self.trim < 0.5, f"trim must be in [0, 0.5); got {self.trim}", _E)


@dataclasses.dataclass(frozen=True)
class UpdateChecksConfig:
    """Bounds every site update must respect before it is aggregated.

    Args:
        max_norm: largest allowed global L2 norm of an update (local - global weights). Defaults to 1e3.
        max_site_share: largest share of the example weights one site can get in a weighted mean, whatever
            count it reports. Defaults to 0.5 (with n sites it is at least 1 / n).
        max_reply_bytes: replies larger than this are refused before decoding; 0 (default): twice the fp32
            size of the part of the model sites send back, plus 1 MiB.
    """

    max_norm: float = 1e3
    max_site_share: float = 0.5
    max_reply_bytes: int = 0

    def __post_init__(self) -> None:
        check(self.max_norm > 0, f"max-norm must be > 0; got {self.max_norm}", _E)
        check(0 < self.max_site_share <= 1, f"max-site-share must be in (0, 1]; got {self.max_site_share}", _E)
        check(self.max_reply_bytes >= 0, f"max-reply-bytes must be >= 0; got {self.max_reply_bytes}", _E)


@dataclasses.dataclass(frozen=True)
class PrivacyRequirements:
    """What the coordinator requires of every site's privacy settings (enforced by the privacy area).

    Args:
        require_dp: refuse updates from sites that do not train with DP-SGD.
        max_epsilon_per_round: largest epsilon a site may spend in one round (0: no limit).
        central_dp: clip each site's update to ``central-dp-clip`` (L2) and add Gaussian noise of
            ``central-dp-noise-multiplier * central-dp-clip`` to their sum (site-level DP of the aggregate;
            equal weights, fedavg/fedprox only). Its epsilon at ``central-dp-delta`` is reported per round.
    """

    require_dp: bool = False
    max_epsilon_per_round: float = 0.0
    central_dp: bool = False
    central_dp_noise_multiplier: float = 1.0
    central_dp_clip: float = 1.0
    central_dp_delta: float = 1e-3

    def __post_init__(self) -> None:
        check(self.max_epsilon_per_round >= 0,
              f"max-epsilon-per-round must be >= 0; got {self.max_epsilon_per_round}", _E)
        check(self.central_dp_noise_multiplier > 0,
              f"central-dp-noise-multiplier must be > 0; got {self.central_dp_noise_multiplier}", _E)
        check(self.central_dp_clip > 0, f"central-dp-clip must be > 0; got {self.central_dp_clip}", _E)
        check(0 < self.central_dp_delta < 1, f"central-dp-delta must be in (0, 1); got {self.central_dp_delta}", _E)


@dataclasses.dataclass(frozen=True)
class ServerSection:
    """Deployment settings of the coordinator (SuperLink address, TLS, metrics, audit log)."""

    superlink: str = "127.0.0.1:9091"
    root_certificates: str = ""
    certificate: str = ""
    private_key: str = ""
    metrics_port: int = 0
    audit_log: bool = True

    def __post_init__(self) -> None:
        check(0 <= self.metrics_port < 65536, f"metrics-port must be in [0, 65535]; got {self.metrics_port}", _E)


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """The whole ``federation.yaml``.

    Args:
        model: model name and overrides.
        classes: ILD class names, in label order (labels index this tuple); sent to the sites with every
            request, checked against each site's labels by ``lungmae site prepare --classes``.
        sites: authenticated node id -> site name (the ids ``flwr supernode register`` printed for the sites'
            public keys). With entries, a site is named by its node only and unlisted nodes take no part;
            empty (simulation), sites are shown under the names they claim, flagged unverified.
        phases: pretrain / finetune settings.
        strategy: aggregation strategy.
        round_timeout_s: how long a round waits for replies (seconds); late replies are dropped.
        run_dir: where state, checkpoints, metrics and the exported model go.
        resume: continue from ``run_dir/state.json`` when it exists (same config hash required).
        compression: encoding of the updates sites send: ``fp16`` (default), ``fp32``, ``int8`` (per-block
            scales) or ``topk`` (10% sparse; see docs/performance.md).
        update_checks: bounds on updates.
        seed: run seed (site sampling, model init, site generators).
        privacy: requirements on the sites' DP settings.
        cross_site: the cross-site evaluation matrix after the final evaluation.
        server: deployment settings.
    """

    model: ModelSection = ModelSection()
    classes: tuple[str, ...] = DEFAULT_CLASSES
    sites: dict[int | str, str] = dataclasses.field(default_factory=dict)
    phases: PhasesSection = PhasesSection()
    strategy: StrategyConfig = StrategyConfig()
    round_timeout_s: float = 600.0
    run_dir: Path = Path("runs/federation")
    resume: bool = True
    compression: Literal["fp32", "fp16", "int8", "topk"] = "fp16"
    update_checks: UpdateChecksConfig = UpdateChecksConfig()
    seed: int = 0
    privacy: PrivacyRequirements = PrivacyRequirements()
    cross_site: CrossSiteConfig = CrossSiteConfig()
    server: ServerSection = ServerSection()

    def __post_init__(self) -> None:
        try:
            check_class_names(self.classes, "classes")
        except ContractError as exc:
            raise _E(str(exc)) from None
        for node, name in self.sites.items():
            check(isinstance(node, int) or (isinstance(node, str) and node.isdigit()),
                  f"sites: keys must be node ids (integers); got {node!r}", _E)
            check(isinstance(name, str) and bool(_SITE_NAME.match(name)),
                  f"sites: {node}: a site name is 1-64 letters, digits, '_', '.' or '-'; got {name!r}", _E)
        check(len(set(self.sites.values())) == len(self.sites), "sites: two nodes have the same site name", _E)
        check(self.round_timeout_s > 0, f"round-timeout-s must be > 0; got {self.round_timeout_s}", _E)
        check(self.compression in COMPRESSIONS, f"compression must be one of {COMPRESSIONS}", _E)
        check(not self.privacy.central_dp or self.strategy.name in ("fedavg", "fedprox"),
              f"privacy central-dp needs strategy fedavg or fedprox (an equal-weight mean of clipped updates); "
              f"got {self.strategy.name!r}", _E)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def site_names(self) -> dict[int, str]:
        """``sites`` with integer node ids."""
        return {int(k): str(v) for k, v in self.sites.items()}


def federation_from_mapping(mapping: Mapping[str, Any] | None, source: str = "federation config",
                            base_dir: Path | None = None) -> FederationConfig:
    """Validate a mapping (parsed YAML) into a :class:`FederationConfig`.

    ``model`` may be a plain name (``model: tiny``). A relative ``run-dir`` is resolved against
    ``base_dir`` (the YAML file's folder) when given.

    Raises:
        FederationConfigError: naming ``source``, the key and what was expected.
    """
    data = dict(mapping or {})
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    cfg = from_mapping(FederationConfig, data, source=source, error=_E)
    if base_dir is not None and not cfg.run_dir.is_absolute():
        cfg = dataclasses.replace(cfg, run_dir=base_dir / cfg.run_dir)
    return cfg


def load_federation_config(path: str | os.PathLike[str]) -> FederationConfig:
    """Read and validate ``federation.yaml``; relative paths in it are relative to the file.

    Raises:
        FederationConfigError: the file is missing, not YAML, or has an unknown key or a bad value
            (the message names the file and the key).
    """
    path = Path(path)
    return federation_from_mapping(load_yaml(path, error=_E), source=str(path), base_dir=path.parent.resolve())


def federation_from_run_config(run_config: Mapping[str, Any]) -> FederationConfig:
    """Build the config the deployed ServerApp uses from Flower's ``context.run_config``.

    Keys (declared in pyproject ``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):
    ``federation-config`` (path of the YAML; empty: built-in defaults), ``run-dir`` (non-empty overrides
    the file's), ``pretrain-rounds`` / ``finetune-rounds`` (>= 0 override the file's).

    Raises:
        FederationConfigError: for a bad YAML or override.
    """
    path = str(run_config.get("federation-config", "") or "")
    cfg = load_federation_config(path) if path else FederationConfig()
    run_dir = str(run_config.get("run-dir", "") or "")
    if run_dir:
        cfg = dataclasses.replace(cfg, run_dir=Path(run_dir).expanduser())
    phases = cfg.phases
    for key, name in (("pretrain-rounds", "pretrain"), ("finetune-rounds", "finetune")):
        value = run_config.get(key, -1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _E(f"run config '{key}' must be an integer; got {value!r}")
        if value >= 0:
            phases = dataclasses.replace(phases, **{name: dataclasses.replace(getattr(phases, name), rounds=value)})
    if phases is not cfg.phases:
        cfg = dataclasses.replace(cfg, phases=from_mapping(PhasesSection, to_mapping(phases),
                                                            source="run config", error=_E))
    return cfg


def federation_to_mapping(cfg: FederationConfig) -> dict[str, Any]:
    """JSON-ready kebab-case mapping (what ``run_config.json`` holds); loads back with the same values."""
    return to_mapping(cfg)


# Keys that change where/how the run is hosted but not what it computes: not part of the hash.
_HOSTING_KEYS = ("run-dir", "resume", "server", "round-timeout-s", "sites")


def config_hash(cfg: FederationConfig) -> str:
    """sha256 of the configuration that determines the results (hosting keys left out).

    A checkpoint stores it; resuming under a different hash is refused.
    """
    data = {k: v for k, v in to_mapping(cfg).items() if k not in _HOSTING_KEYS}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
