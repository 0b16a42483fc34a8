"""The message schema between the coordinator and the sites: config keys and reply metric key sets.

Flower's FedAvg raises ``InconsistentMessageReplies`` when sites answer with different metric keys, and a
site that leaves a key out when it has nothing to report makes the whole round fail. So every reply of a
given kind carries exactly the keys listed here, always ``num-examples`` (the aggregation weight) and
always ``epsilon`` (the site's total privacy spent so far, at its delta; 0.0 without DP). Values are plain
ints and floats (one list of ints: the confusion matrix); nothing per scan, no identifiers, no paths.

Framework-free (no ``flwr``): the ClientApp and ServerApp put these mappings into ``MetricRecord`` /
``ConfigRecord`` objects themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lungmae_core.errors import LungMAEError

__all__ = [
    "SchemaError",
    "PRETRAIN", "FINETUNE", "FINAL", "PHASES", "EVAL_STAGES",
    "QUERY", "TRAIN", "EVALUATE",
    "CONFIG_KEYS", "REPLY_KEYS", "SITE_NAME_KEY", "SITE_RECORD",
    "reply_keys", "build_metrics", "check_metrics", "config_value",
]


class SchemaError(LungMAEError, ValueError):
    """A message config or a reply does not follow the schema (missing, unexpected or non-numeric keys)."""


# Phases of the schedule carried in the message config under "phase".
PRETRAIN = "pretrain"
FINETUNE = "finetune"
FINAL = "final"  # evaluation of the final global classifier on every site's held-out test split
PHASES: tuple[str, ...] = (PRETRAIN, FINETUNE)
EVAL_STAGES: tuple[str, ...] = (PRETRAIN, FINETUNE, FINAL)

# Message kinds (Flower message types: "query", "train", "evaluate").
QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"

# Keys the server puts in every ConfigRecord it sends (besides FedAvg's own "server-round").
CONFIG_KEYS: dict[str, str] = {
    "phase": "pretrain | finetune | final",
    "server-round": "round number across the whole schedule, from 1",
    "lr": "peak learning rate of this round's local training",
    "local-epochs": "local epochs this round",
    "phase-round": "round within the phase, from 1 (with phase-rounds: this round's segment of the global lr curve)",
    "phase-rounds": "rounds of the phase",
    "proximal-mu": "FedProx proximal term weight (0.0: plain FedAvg)",
    "compression": "encoding of the update the site sends back: fp32 | fp16 | int8",
    "finetune-mode": "full | linear-probe",
    "model-config": "JSON of the ModelConfig (plain hyper-parameters)",
    "num-classes": "number of ILD classes of the classifier",
    "seed": "run seed; sites derive their generators from (seed, server-round, site)",
    "split": "evaluation split at the site: val | test",
}

# The ConfigRecord a query reply carries, with the site's display name (no paths, no patient data).
SITE_RECORD = "site"
SITE_NAME_KEY = "site-name"

REPLY_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    # What a site can serve: counts only, and its privacy settings.
    (QUERY, ""): ("num-examples", "num-unlabelled", "num-labelled-train", "num-labelled-val",
                  "num-labelled-test", "dp-enabled", "epsilon", "epsilon-budget", "has-gpu"),
    (TRAIN, PRETRAIN): ("num-examples", "train-loss", "train-loss-lung", "train-loss-non-lung",
                        "epsilon", "train-seconds", "update-bytes"),
    (EVALUATE, PRETRAIN): ("num-examples", "l1-masked", "l1-masked-lung", "baseline-l1-masked",
                           "baseline-l1-masked-lung", "epsilon"),
    (TRAIN, FINETUNE): ("num-examples", "train-loss", "train-accuracy", "epsilon", "train-seconds",
                        "update-bytes"),
    (EVALUATE, FINETUNE): ("num-examples", "loss", "accuracy", "balanced-accuracy", "weighted-f1",
                           "roc-auc", "roc-auc-valid", "confusion-matrix", "epsilon"),
    (EVALUATE, FINAL): ("num-examples", "loss", "accuracy", "balanced-accuracy", "weighted-f1",
                        "roc-auc", "roc-auc-valid", "confusion-matrix", "epsilon"),
}


def reply_keys(kind: str, phase: str = "") -> tuple[str, ...]:
    """The exact metric keys of a reply of ``kind`` (query/train/evaluate) in ``phase``.

    Raises:
        SchemaError: for a (kind, phase) pair that has no reply schema.
    """
    key = (kind, "" if kind == QUERY else phase)
    if key not in REPLY_KEYS:
        known = ", ".join(f"{k}/{p}" if p else k for k, p in REPLY_KEYS)
        raise SchemaError(f"There is no reply schema for {kind!r} in phase {phase!r}; known: {known}")
    return REPLY_KEYS[key]


def _plain(key: str, value: Any) -> int | float | list[int] | list[float]:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _plain(key, value.item())
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        flat: list[Any] = []
        stack = list(value)
        while stack:  # flatten nested lists (a confusion matrix) row by row
            item = stack.pop(0)
            if isinstance(item, (list, tuple)):
                stack[:0] = list(item)
            else:
                flat.append(item)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            return [int(v) for v in flat]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            return [float(v) for v in flat]
    raise SchemaError(f"Reply metric {key!r} must be a number or a list of numbers; got {type(value).__name__}")


def build_metrics(kind: str, phase: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``values`` into the exact key set of a reply, in schema order, as plain ints/floats.

    Non-finite floats are replaced by 0.0 *only* for ``roc-auc`` (undefined when a site's split has one
    class; ``roc-auc-valid`` says so); anywhere else they are an error, because the server must never
    average NaN into the global metrics.

    Raises:
        SchemaError: listing the missing and unexpected keys, or the non-numeric / non-finite one.
    """
    expected = reply_keys(kind, phase)
    missing = [k for k in expected if k not in values]
    unexpected = sorted(set(values) - set(expected))
    if missing or unexpected:
        raise SchemaError(
            f"Unable to build the {kind}/{phase or '-'} reply as keys are missing {missing} "
            f"or unexpected {unexpected}; expected exactly {list(expected)}")
    out: dict[str, Any] = {}
    for key in expected:
        value = _plain(key, values[key])
        if isinstance(value, float) and not math.isfinite(value):
            if key != "roc-auc":
                raise SchemaError(f"Unable to build the {kind}/{phase or '-'} reply as {key!r} is {value}")
            value = 0.0
        out[key] = value
    return out


def check_metrics(kind: str, phase: str, record: Mapping[str, Any]) -> None:
    """Server side: verify a received metric mapping has exactly the schema's keys and a sane weight.

    Raises:
        SchemaError: naming the missing/unexpected keys, or a negative/non-integer ``num-examples``.
    """
    expected = reply_keys(kind, phase)
    missing = [k for k in expected if k not in record]
    unexpected = sorted(set(record) - set(expected))
    if missing or unexpected:
        raise SchemaError(f"{kind}/{phase or '-'} reply has missing keys {missing} and unexpected keys {unexpected}")
    n = record["num-examples"]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0 or int(n) != n:
        raise SchemaError(f"{kind}/{phase or '-'} reply has num-examples {n!r}; expected a count >= 0")


def config_value(config: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """Read ``key`` from a received message config as ``kind`` with a clear error.

    Raises:
        SchemaError: when the key is missing (and no default) or has the wrong type.
    """
    if key not in config:
        if default is not None:
            return default
        raise SchemaError(f"Message config has no {key!r} ({CONFIG_KEYS.get(key, 'unknown key')})")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SchemaError(f"Message config {key!r} must be {kind.__name__}; got {value!r}")
    return value
