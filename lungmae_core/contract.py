"""The wire contract between the coordinator and the sites: typed, versioned, bounded messages.

Everything that crosses the wire is one of these dataclasses, with one ``encode``/``decode`` pair each:

* :class:`RoundConfig`: what the coordinator *asks* (phase, round, model, optimiser settings,
  ``proximal_mu``, DP request, evaluation split, class list). The site decodes it and then checks it
  against its own policy (``client.policy``) before any work: the config is a request, not an order.
* :class:`QueryReply`, :class:`TrainReply`, :class:`EvalReply`: what a site answers. The server decodes
  each reply on its own; a reply that fails decoding is dropped with the check that failed.
* :class:`RoundRecord`: the line the runner writes to ``metrics.jsonl`` and the report reads back.

``decode`` checks every key, type and bound and raises :class:`ContractError` (never a raw
``KeyError``/``TypeError``): a hostile or buggy peer cannot crash the other side with a malformed message.
Every message carries :data:`CONTRACT_VERSION`; a mismatch is a :class:`ContractError` on either side.

Vocabulary: message *config* keys are kebab-case (like ``federation.yaml``); every *metric* key is
snake_case, the same name from ``lungmae_core.metrics`` to the wire, ``metrics.json`` and the report.
A metric that is not defined (a class missing from a split, training metrics withheld under DP) travels
as ``0.0`` with ``<name>_defined = 0`` and is ``None`` once decoded: never NaN, never a fake perfect score.

Framework-free (no ``flwr``, no ``torch``): the ClientApp/ServerApp put the encoded mappings into
``ConfigRecord``/``MetricRecord`` objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lungmae_core.contract_fields import (
    CONTRACT_VERSION,
    MAX_EXAMPLES,
    ContractError,
    check_version,
    exact_keys,
    get_field,
    read_bool,
    read_choice,
    read_counts,
    read_float,
    read_int,
    show,
)

__all__ = [
    "CONTRACT_VERSION", "ContractError",
    "PRETRAIN", "FINETUNE", "FINAL", "CROSS_SITE", "PHASES", "EVAL_STAGES", "QUERY", "TRAIN", "EVALUATE",
    "SPLITS", "POOLINGS", "COMPRESSIONS", "FINETUNE_MODES", "HIST_BINS", "MAX_CLASSES", "MAX_EXAMPLES",
    "DEFAULT_CLASSES",
    "RoundConfig", "QueryReply", "TrainReply", "EvalReply", "RoundRecord", "check_class_names",
]

_CONFIG_VERSION = "contract-version"
_REPLY_VERSION = "contract_version"

PRETRAIN, FINETUNE, FINAL = "pretrain", "finetune", "final"
#: The cross-site step after the final evaluation: ``train`` fine-tunes a local copy of the global classifier on
#: the site's train split (only sites whose policy shares it); ``evaluate`` scores one model on the test split.
CROSS_SITE = "cross-site"
PHASES: tuple[str, ...] = (PRETRAIN, FINETUNE)
EVAL_STAGES: tuple[str, ...] = (PRETRAIN, FINETUNE, FINAL, CROSS_SITE)
QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"
SPLITS: tuple[str, ...] = ("train", "val", "test")
POOLINGS: tuple[str, ...] = ("lung", "mean", "cls")  # lungmae_core.heads.POOLINGS (a test keeps them equal)
COMPRESSIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "topk")  # lungmae_core.wire.COMPRESSIONS
FINETUNE_MODES: tuple[str, ...] = ("full", "linear-probe")
TRAIN_METRICS_REQUESTS: tuple[str, ...] = ("if-allowed", "required")
#: Fixed bins over [0, 1] of the per-class score histograms an evaluation reply carries (pooled ROC AUC).
HIST_BINS = 100
MAX_CLASSES = 64
_MAX_ROUND = 1_000_000
_MAX_MODEL_JSON = 16_384
_MAX_FLOAT = 1e12
DEFAULT_CLASSES: tuple[str, ...] = ("normal", "ggo", "fibrosis", "emphysema")
_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,47}$")


def check_class_names(names: Sequence[str], what: str = "class list") -> tuple[str, ...]:
    """Validate a class list (2..64 distinct short names in label order).

    Raises:
        ContractError: naming the first bad name.
    """
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ContractError(f"{what} must be a list of names; got {type(names).__name__}", "class-names")
    names = tuple(names)
    if not 2 <= len(names) <= MAX_CLASSES:
        raise ContractError(f"{what} must have 2..{MAX_CLASSES} names; got {len(names)}", "class-names")
    for n in names:
        if not isinstance(n, str) or not _CLASS_NAME.match(n):
            raise ContractError(f"{what}: {show(n)} is not a class name (1-48 letters, digits, '_.+-')",
                                "class-names")
    if len(set(names)) != len(names):
        raise ContractError(f"{what} must hold distinct names; got {list(names)}", "class-names")
    return names


# ------------------------------------------------------------------------------------------ round config
@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """What the coordinator asks a site to do (query, train or evaluate). Built once per phase.

    ``model_config`` is the plain ``ModelConfig`` mapping of ``model_name`` with the federation's overrides;
    the site checks the name and the built model's size against its policy. ``server_round`` is 0 for the
    query and the final evaluation. ``batch_size`` 0 lets the site pick its own.
    """

    phase: str
    server_round: int
    model_name: str
    model_config: dict[str, Any]
    class_names: tuple[str, ...] = DEFAULT_CLASSES
    pooling: str = "lung"
    finetune_mode: str = "full"
    lr: float = 1e-3
    local_epochs: int = 1
    batch_size: int = 0
    phase_round: int = 0
    phase_rounds: int = 0
    proximal_mu: float = 0.0
    compression: str = "fp16"
    seed: int = 0
    require_dp: bool = False
    max_epsilon_per_round: float = 0.0
    split: str = "val"
    train_metrics: str = "if-allowed"

    KEYS = ("contract-version", "phase", "server-round", "model-name", "model-config", "class-names", "pooling",
            "finetune-mode", "lr", "local-epochs", "batch-size", "phase-round", "phase-rounds", "proximal-mu",
            "compression", "seed", "require-dp", "max-epsilon-per-round", "split", "train-metrics")

    def __post_init__(self) -> None:
        # the coordinator builds these; decoding its own encoding must round-trip
        RoundConfig.decode(self.encode())

    def with_round(self, server_round: int, **changes: Any) -> RoundConfig:
        """The same phase config for another round (and other fields changed)."""
        return dataclasses.replace(self, server_round=server_round, **changes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def encode(self) -> dict[str, Any]:
        """Plain values for a Flower ``ConfigRecord`` (kebab-case keys)."""
        return {"contract-version": CONTRACT_VERSION, "phase": self.phase, "server-round": self.server_round,
                "model-name": self.model_name,
                "model-config": json.dumps(self.model_config, sort_keys=True, default=list),
                "class-names": list(self.class_names), "pooling": self.pooling, "finetune-mode": self.finetune_mode,
                "lr": float(self.lr), "local-epochs": self.local_epochs, "batch-size": self.batch_size,
                "phase-round": self.phase_round, "phase-rounds": self.phase_rounds,
                "proximal-mu": float(self.proximal_mu), "compression": self.compression, "seed": self.seed,
                "require-dp": bool(self.require_dp), "max-epsilon-per-round": float(self.max_epsilon_per_round),
                "split": self.split, "train-metrics": self.train_metrics}

    @classmethod
    def decode(cls, m: Mapping[str, Any]) -> RoundConfig:
        """Check every key and bound of a received config.

        Raises:
            ContractError: a wrong contract version, a missing/unexpected key, a bad type or bound.
        """
        w = "round config"
        check_version(m, _CONFIG_VERSION, w)
        exact_keys(m, cls.KEYS, w)
        raw = get_field(m, "model-config", w)
        if not isinstance(raw, str) or len(raw) > _MAX_MODEL_JSON:
            raise ContractError(f"{w}: 'model-config' must be a JSON text of at most {_MAX_MODEL_JSON} characters",
                                "model-config")
        try:
            model_cfg = json.loads(raw)
        except ValueError:
            raise ContractError(f"{w}: 'model-config' is not valid JSON", "model-config") from None
        if not isinstance(model_cfg, dict):
            raise ContractError(f"{w}: 'model-config' must be a JSON object", "model-config")
        name = get_field(m, "model-name", w)
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise ContractError(f"{w}: 'model-name' must be a name of 1-64 characters; got {show(name)}", "model-name")
        try:
            classes = check_class_names(get_field(m, "class-names", w), f"{w}: 'class-names'")
        except ContractError as exc:
            raise ContractError(str(exc), "class-names") from None
        phase_rounds = read_int(m, "phase-rounds", w, 0, _MAX_ROUND)
        return cls.__new__(cls)._init(
            phase=read_choice(m, "phase", w, EVAL_STAGES), server_round=read_int(m, "server-round", w, 0, _MAX_ROUND),
            model_name=name, model_config=model_cfg, class_names=classes,
            pooling=read_choice(m, "pooling", w, POOLINGS),
            finetune_mode=read_choice(m, "finetune-mode", w, FINETUNE_MODES),
            lr=read_float(m, "lr", w, 0.0, 1.0, open_lo=True), local_epochs=read_int(m, "local-epochs", w, 1, 10_000),
            batch_size=read_int(m, "batch-size", w, 0, 65_536),
            phase_round=read_int(m, "phase-round", w, 0, phase_rounds),
            phase_rounds=phase_rounds, proximal_mu=read_float(m, "proximal-mu", w, 0.0, 1e4),
            compression=read_choice(m, "compression", w, COMPRESSIONS), seed=read_int(m, "seed", w, 0, 2**31 - 1),
            require_dp=read_bool(m, "require-dp", w),
            max_epsilon_per_round=read_float(m, "max-epsilon-per-round", w, 0.0, 1e6),
            split=read_choice(m, "split", w, SPLITS),
            train_metrics=read_choice(m, "train-metrics", w, TRAIN_METRICS_REQUESTS))

    def _init(self, **values: Any) -> RoundConfig:
        for k, v in values.items():  # frozen: set fields without re-running __post_init__'s round trip
            object.__setattr__(self, k, v)
        return self


# ------------------------------------------------------------------------------------------------ replies
def _optional_keys(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(k for n in names for k in (n, f"{n}_defined"))


def _encode_optional(values: Mapping[str, float | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        defined = v is not None and math.isfinite(float(v))
        out[k] = float(v) if defined else 0.0  # type: ignore[arg-type]
        out[f"{k}_defined"] = int(defined)
    return out


def _decode_optional(m: Mapping[str, Any], names: Sequence[str], what: str,
                     bounds: Mapping[str, tuple[float, float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for n in names:
        defined = read_bool(m, f"{n}_defined", what)
        lo, hi = bounds.get(n, (0.0, _MAX_FLOAT))
        value = read_float(m, n, what, lo, hi)
        out[n] = value if defined else None
    return out


_FRACTION = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class QueryReply:
    """What a site can serve: counts of accepted scans and its privacy settings (no name: the server names
    sites from their authenticated node). ``num_examples`` = unlabelled + labelled training scans.

    ``min_count`` and ``share_local_model`` are the site's policy (``policy: min-count``,
    ``share-local-model``) as far as the cross-site matrix needs it: which counts to withhold in
    ``metrics.json``, and whether to ask the site for a locally fine-tuned model at all (the site refuses
    anyway when its policy says no).
    """

    num_unlabelled: int
    num_labelled_train: int
    num_labelled_val: int
    num_labelled_test: int
    dp_enabled: bool
    epsilon: float
    epsilon_budget: float
    has_gpu: bool
    min_count: int = 10
    share_local_model: bool = False

    KEYS = ("contract_version", "num_examples", "num_unlabelled", "num_labelled_train", "num_labelled_val",
            "num_labelled_test", "dp_enabled", "epsilon", "epsilon_budget", "has_gpu", "min_count",
            "share_local_model")

    @property
    def num_examples(self) -> int:
        return self.num_unlabelled + self.num_labelled_train

    def encode(self) -> dict[str, Any]:
        return {"contract_version": CONTRACT_VERSION, "num_examples": self.num_examples,
                "num_unlabelled": self.num_unlabelled, "num_labelled_train": self.num_labelled_train,
                "num_labelled_val": self.num_labelled_val, "num_labelled_test": self.num_labelled_test,
                "dp_enabled": int(self.dp_enabled), "epsilon": float(self.epsilon),
                "epsilon_budget": float(self.epsilon_budget), "has_gpu": int(self.has_gpu),
                "min_count": int(self.min_count), "share_local_model": int(self.share_local_model)}

    @classmethod
    def decode(cls, m: Mapping[str, Any]) -> QueryReply:
        w = "query reply"
        check_version(m, _REPLY_VERSION, w)
        exact_keys(m, cls.KEYS, w)
        c = {k: read_int(m, k, w, 0, MAX_EXAMPLES) for k in cls.KEYS[1:6]}
        if c["num_examples"] != c["num_unlabelled"] + c["num_labelled_train"]:
            raise ContractError(f"{w}: 'num_examples' {c['num_examples']} is not num_unlabelled + num_labelled_train",
                                "num_examples")
        return cls(num_unlabelled=c["num_unlabelled"], num_labelled_train=c["num_labelled_train"],
                   num_labelled_val=c["num_labelled_val"], num_labelled_test=c["num_labelled_test"],
                   dp_enabled=read_bool(m, "dp_enabled", w), epsilon=read_float(m, "epsilon", w, 0.0, 1e6),
                   epsilon_budget=read_float(m, "epsilon_budget", w, 0.0, 1e6), has_gpu=read_bool(m, "has_gpu", w),
                   min_count=read_int(m, "min_count", w, 1, MAX_EXAMPLES),
                   share_local_model=read_bool(m, "share_local_model", w))


_TRAIN_OPTIONAL = ("loss", "loss_lung", "loss_non_lung", "accuracy")


@dataclasses.dataclass(frozen=True)
class TrainReply:
    """The metrics beside a site's update. ``server_round`` echoes the request (replays are dropped);
    ``epsilon`` is the site's total spent so far (0 without DP). Training loss/accuracy are ``None`` when
    the site withholds them (always under DP: they are not noised)."""

    server_round: int
    num_examples: int
    epsilon: float
    train_seconds: float
    update_bytes: int
    loss: float | None = None
    loss_lung: float | None = None
    loss_non_lung: float | None = None
    accuracy: float | None = None

    KEYS = ("contract_version", "server_round", "num_examples", "epsilon", "train_seconds", "update_bytes",
            *_optional_keys(_TRAIN_OPTIONAL))

    def encode(self) -> dict[str, Any]:
        return {"contract_version": CONTRACT_VERSION, "server_round": self.server_round,
                "num_examples": int(self.num_examples), "epsilon": float(self.epsilon),
                "train_seconds": float(self.train_seconds), "update_bytes": int(self.update_bytes),
                **_encode_optional({k: getattr(self, k) for k in _TRAIN_OPTIONAL})}

    def metrics(self) -> dict[str, Any]:
        """snake_case metrics for ``metrics.json`` (undefined values as ``None``)."""
        return {k: getattr(self, k) for k in ("num_examples", "epsilon", "train_seconds", "update_bytes",
                                              *_TRAIN_OPTIONAL)}

    @classmethod
    def decode(cls, m: Mapping[str, Any]) -> TrainReply:
        w = "train reply"
        check_version(m, _REPLY_VERSION, w)
        exact_keys(m, cls.KEYS, w)
        opt = _decode_optional(m, _TRAIN_OPTIONAL, w, {"accuracy": _FRACTION, "loss": (0.0, 1e6),
                                                         "loss_lung": (0.0, 1e6), "loss_non_lung": (0.0, 1e6)})
        return cls(server_round=read_int(m, "server_round", w, 0, _MAX_ROUND),
                   num_examples=read_int(m, "num_examples", w, 1, MAX_EXAMPLES),
                   epsilon=read_float(m, "epsilon", w, 0.0, 1e6),
                   train_seconds=read_float(m, "train_seconds", w, 0.0, 1e7),
                   update_bytes=read_int(m, "update_bytes", w, 0, 2**62), **opt)


_EVAL_OPTIONAL = ("loss", "accuracy", "balanced_accuracy", "weighted_f1", "roc_auc", "l1_masked", "l1_masked_lung",
                  "baseline_l1_masked", "baseline_l1_masked_lung")
_EVAL_BOUNDS = {"accuracy": _FRACTION, "balanced_accuracy": _FRACTION, "weighted_f1": _FRACTION,
                "roc_auc": _FRACTION, "loss": (0.0, 1e6), "l1_masked": (0.0, 1e6), "l1_masked_lung": (0.0, 1e6),
                "baseline_l1_masked": (0.0, 1e6), "baseline_l1_masked_lung": (0.0, 1e6)}


@dataclasses.dataclass(frozen=True)
class EvalReply:
    """A site's evaluation of the global model on one split.

    ``confusion_matrix`` (row-major, classes x classes, rows: truth) and ``score_histogram`` (per class c:
    :data:`HIST_BINS` counts of ``p_c`` over scans of class c, then HIST_BINS counts over the other scans)
    are empty when the site suppressed them (``suppressed``: fewer scans than its policy's minimum count)
    and for the MAE. ``classes_present`` counts the classes the split contains.
    """

    server_round: int
    num_examples: int
    epsilon: float
    classes_present: int = 0
    suppressed: bool = False
    confusion_matrix: tuple[int, ...] = ()
    score_histogram: tuple[int, ...] = ()
    loss: float | None = None
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    weighted_f1: float | None = None
    roc_auc: float | None = None
    l1_masked: float | None = None
    l1_masked_lung: float | None = None
    baseline_l1_masked: float | None = None
    baseline_l1_masked_lung: float | None = None

    KEYS = ("contract_version", "server_round", "num_examples", "epsilon", "classes_present", "suppressed",
            "confusion_matrix", "score_histogram", *_optional_keys(_EVAL_OPTIONAL))

    def encode(self) -> dict[str, Any]:
        return {"contract_version": CONTRACT_VERSION, "server_round": self.server_round,
                "num_examples": int(self.num_examples), "epsilon": float(self.epsilon),
                "classes_present": int(self.classes_present), "suppressed": int(self.suppressed),
                "confusion_matrix": [int(x) for x in self.confusion_matrix],
                "score_histogram": [int(x) for x in self.score_histogram],
                **_encode_optional({k: getattr(self, k) for k in _EVAL_OPTIONAL})}

    def metrics(self) -> dict[str, Any]:
        """snake_case scalar metrics for ``metrics.json`` (undefined as ``None``; the lists left out)."""
        return {"num_examples": self.num_examples, "epsilon": self.epsilon, "classes_present": self.classes_present,
                "suppressed": self.suppressed, **{k: getattr(self, k) for k in _EVAL_OPTIONAL}}

    @classmethod
    def decode(cls, m: Mapping[str, Any], *, num_classes: int) -> EvalReply:
        """Raises ContractError; the confusion matrix must be ``num_classes`` squared non-negative integers
        summing to ``num_examples``, the histogram 2 x num_classes x HIST_BINS counts of num_examples each."""
        w = "evaluate reply"
        check_version(m, _REPLY_VERSION, w)
        exact_keys(m, cls.KEYS, w)
        n = read_int(m, "num_examples", w, 1, MAX_EXAMPLES)
        k = num_classes
        cm = read_counts(m, "confusion_matrix", w, (0, k * k))
        if cm and sum(cm) != n:
            raise ContractError(f"{w}: 'confusion_matrix' sums to {sum(cm)}, not num_examples {n}", "confusion_matrix")
        hist = read_counts(m, "score_histogram", w, (0, 2 * k * HIST_BINS))
        for c in range(k if hist else 0):
            block = hist[2 * c * HIST_BINS:2 * (c + 1) * HIST_BINS]
            if sum(block) != n:
                raise ContractError(f"{w}: 'score_histogram' of class {c} counts {sum(block)} scans, not {n}",
                                    "score_histogram")
        return cls(server_round=read_int(m, "server_round", w, 0, _MAX_ROUND), num_examples=n,
                   epsilon=read_float(m, "epsilon", w, 0.0, 1e6),
                   classes_present=read_int(m, "classes_present", w, 0, k),
                   suppressed=read_bool(m, "suppressed", w), confusion_matrix=cm, score_histogram=hist,
                   **_decode_optional(m, _EVAL_OPTIONAL, w, _EVAL_BOUNDS))


# ----------------------------------------------------------------------------------------- round record
def _metric_map(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise ContractError(f"{what} must be a mapping of metrics; got {type(v).__name__}", what)
    for key, x in v.items():
        ok = x is None or isinstance(x, (bool, str)) or (isinstance(x, (int, float)) and math.isfinite(float(x)))
        if not ok and not isinstance(x, (list, Mapping)):
            raise ContractError(f"{what}: metric {key!r} must be a finite number, null, a list or a mapping; "
                                f"got {show(x)}", what)
    return dict(v)


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``: a training round as the server saw it (aggregates, per-site metrics,
    participation, drops with their reason; never a value of an update)."""

    round: int
    phase: str
    phase_round: int
    phase_rounds: int
    step: int
    train: dict[str, Any]
    evaluate: dict[str, Any]
    participation: dict[str, Any]
    failures: list[dict[str, Any]]
    rejected_updates: list[dict[str, Any]]
    bytes: dict[str, int]
    skipped: bool = False
    note: str = ""
    duration_s: float = 0.0

    def encode(self) -> dict[str, Any]:
        return {"contract_version": CONTRACT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def decode(cls, m: Mapping[str, Any]) -> RoundRecord:
        """Raises ContractError naming the field (a hand-edited or foreign ``metrics.jsonl`` line)."""
        w = "round record"
        check_version(m, _REPLY_VERSION, w)
        fields = [f.name for f in dataclasses.fields(cls)]
        exact_keys(m, ("contract_version", *fields), w)
        parts: dict[str, Any] = {}
        for part in ("train", "evaluate"):
            block = get_field(m, part, w)
            if not isinstance(block, Mapping) or set(block) != {"aggregated", "sites"}:
                raise ContractError(f"{w}: {part!r} must hold 'aggregated' and 'sites'", part)
            sites = block["sites"]
            if not isinstance(sites, Mapping):
                raise ContractError(f"{w}: {part}.sites must be a mapping", part)
            parts[part] = {"aggregated": _metric_map(block["aggregated"], f"{part}.aggregated"),
                           "sites": {str(s): _metric_map(v, f"{part}.sites.{s}") for s, v in sites.items()}}
        for key in ("participation", "bytes"):
            if not isinstance(get_field(m, key, w), Mapping):
                raise ContractError(f"{w}: {key!r} must be a mapping", key)
        for key in ("failures", "rejected_updates"):
            v = get_field(m, key, w)
            if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
                raise ContractError(f"{w}: {key!r} must be a list of mappings", key)
        note = get_field(m, "note", w)
        if not isinstance(note, str):
            raise ContractError(f"{w}: 'note' must be text", "note")
        return cls(round=read_int(m, "round", w, 0, _MAX_ROUND), phase=read_choice(m, "phase", w, PHASES),
                   phase_round=read_int(m, "phase_round", w, 0, _MAX_ROUND),
                   phase_rounds=read_int(m, "phase_rounds", w, 0, _MAX_ROUND),
                   step=read_int(m, "step", w, 0, _MAX_ROUND),
                   train=parts["train"], evaluate=parts["evaluate"], participation=dict(m["participation"]),
                   failures=[dict(x) for x in m["failures"]], rejected_updates=[dict(x) for x in m["rejected_updates"]],
                   bytes=dict(m["bytes"]), skipped=read_bool(m, "skipped", w), note=note,
                   duration_s=read_float(m, "duration_s", w, 0.0, 1e9))
