"""Message schema: exact key sets per reply kind, plain values, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungmae_core.schema import (
    EVALUATE, FINAL, FINETUNE, PRETRAIN, QUERY, REPLY_KEYS, TRAIN, SchemaError, build_metrics, check_metrics,
    config_value, reply_keys,
)


@pytest.mark.parametrize("kind, phase", list(REPLY_KEYS))
def test_every_reply_has_weight_and_epsilon(kind: str, phase: str) -> None:
    keys = reply_keys(kind, phase)
    assert "num-examples" in keys and "epsilon" in keys and len(set(keys)) == len(keys)


def test_build_metrics_plain_values_and_order() -> None:
    values = {"num-examples": np.int64(6), "loss": 1.0, "accuracy": 0.5, "balanced-accuracy": 0.5,
              "weighted-f1": 0.4, "roc-auc": float("nan"), "roc-auc-valid": False,
              "confusion-matrix": np.eye(4, dtype=np.int64), "epsilon": 0.0}
    out = build_metrics(EVALUATE, FINAL, values)
    assert list(out) == list(reply_keys(EVALUATE, FINAL))
    assert out["num-examples"] == 6 and type(out["num-examples"]) is int
    assert out["roc-auc"] == 0.0 and out["roc-auc-valid"] == 0
    assert out["confusion-matrix"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    check_metrics(EVALUATE, FINAL, out)


@pytest.mark.parametrize("kind, phase, values, message", [
    (TRAIN, PRETRAIN, {"num-examples": 1}, "keys are missing ['train-loss'"),
    (TRAIN, FINETUNE, {k: 0.0 for k in REPLY_KEYS[(TRAIN, FINETUNE)]} | {"extra": 1}, "unexpected ['extra']"),
    (TRAIN, FINETUNE, {k: 0.0 for k in REPLY_KEYS[(TRAIN, FINETUNE)]} | {"train-loss": math.inf},
     "'train-loss' is inf"),
    (QUERY, "", {k: "x" for k in REPLY_KEYS[(QUERY, "")]}, "must be a number or a list of numbers; got str"),
    ("train", "bogus", {}, "There is no reply schema for 'train' in phase 'bogus'"),
])
def test_build_metrics_errors(kind: str, phase: str, values: dict, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        build_metrics(kind, phase, values)
    assert message in str(info.value)


def test_check_metrics_rejects_bad_weight_and_keys() -> None:
    good = {k: 0 for k in reply_keys(TRAIN, PRETRAIN)}
    with pytest.raises(SchemaError, match="num-examples -1"):
        check_metrics(TRAIN, PRETRAIN, good | {"num-examples": -1})
    with pytest.raises(SchemaError, match=r"missing keys \['epsilon'\]"):
        check_metrics(TRAIN, PRETRAIN, {k: v for k, v in good.items() if k != "epsilon"})


def test_config_value() -> None:
    assert config_value({"lr": 1}, "lr", float) == 1.0
    assert config_value({}, "seed", int, 5) == 5
    with pytest.raises(SchemaError, match="Message config has no 'phase'"):
        config_value({}, "phase", str)
    with pytest.raises(SchemaError, match="'local-epochs' must be int; got True"):
        config_value({"local-epochs": True}, "local-epochs", int)
