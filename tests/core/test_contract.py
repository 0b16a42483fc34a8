"""The wire contract: every message round-trips, and decoding refuses anything off-contract with a typed error."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lungmae_core.contract import (
    COMPRESSIONS,
    CONTRACT_VERSION,
    HIST_BINS,
    POOLINGS,
    ContractError,
    EvalReply,
    QueryReply,
    RoundConfig,
    RoundRecord,
    TrainReply,
)

CFG = RoundConfig(phase="finetune", server_round=4, model_name="tiny", model_config={"name": "tiny", "img-size": 32},
                  class_names=("uip", "nsip", "hp"), pooling="mean", lr=1e-3, local_epochs=2, phase_round=1,
                  phase_rounds=3, proximal_mu=0.01, require_dp=True, max_epsilon_per_round=1.0, split="test")


def test_the_contract_constants_match_the_implementations() -> None:
    from lungmae_core.heads import POOLINGS as HEADS_POOLINGS
    from lungmae_core.metrics import HIST_BINS as METRICS_BINS
    from lungmae_core.wire import COMPRESSIONS as WIRE_COMPRESSIONS

    assert POOLINGS == HEADS_POOLINGS and COMPRESSIONS == WIRE_COMPRESSIONS and HIST_BINS == METRICS_BINS


def test_round_config_round_trips_and_carries_the_version_and_the_class_list() -> None:
    encoded = CFG.encode()
    assert encoded["contract-version"] == CONTRACT_VERSION and encoded["class-names"] == ["uip", "nsip", "hp"]
    assert RoundConfig.decode(encoded) == CFG and CFG.num_classes == 3
    assert CFG.with_round(5, phase_round=2).server_round == 5


@pytest.mark.parametrize("change, field, message", [
    ({"contract-version": 2}, "contract-version",
     f"contract version 2 but this side speaks version {CONTRACT_VERSION}"),
    ({"contract-version": True}, "contract-version", "contract version True"),
    ({"phase": "attack"}, "phase", "'phase' must be one of pretrain, finetune, final"),
    ({"lr": 0.0}, "lr", "'lr' must be in (0, 1]"),
    ({"lr": "1e-3"}, "lr", "'lr' must be a number; got str"),
    ({"local-epochs": 0}, "local-epochs", "'local-epochs' must be in [1, 10000]"),
    ({"local-epochs": 2.5}, "local-epochs", "'local-epochs' must be an integer"),
    ({"phase-round": 4}, "phase-round", "'phase-round' must be in [0, 3]"),
    ({"proximal-mu": -1.0}, "proximal-mu", "'proximal-mu' must be in [0, 10000]"),
    ({"model-config": "{not json"}, "model-config", "'model-config' is not valid JSON"),
    ({"model-config": "[1, 2]"}, "model-config", "'model-config' must be a JSON object"),
    ({"model-config": "{}" + " " * 20_000}, "model-config", "at most 16384 characters"),
    ({"class-names": ["a", "a"]}, "class-names", "must hold distinct names"),
    ({"class-names": ["ok", "not ok/../x"]}, "class-names", "is not a class name"),
    ({"require-dp": "yes"}, "require-dp", "'require-dp' must be a bool"),
    ({"max-epsilon-per-round": math.inf}, "max-epsilon-per-round", "must be finite"),
    ({"pooling": "max"}, "pooling", "'pooling' must be one of lung, mean, cls"),
])
def test_round_config_decode_names_the_field(change: dict, field: str, message: str) -> None:
    with pytest.raises(ContractError) as info:
        RoundConfig.decode({**CFG.encode(), **change})
    assert info.value.field == field and message in str(info.value)


def test_missing_and_unexpected_keys_and_non_mappings() -> None:
    encoded = CFG.encode()
    del encoded["seed"]
    with pytest.raises(ContractError, match=r"missing keys \['seed'\]"):
        RoundConfig.decode(encoded)
    with pytest.raises(ContractError, match="expected a mapping; got list"):
        RoundConfig.decode([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ContractError):  # the coordinator cannot even build a bad request
        dataclasses.replace(CFG, split="train-and-more")


def test_train_reply_round_trips_with_undefined_metrics_as_none() -> None:
    reply = TrainReply(server_round=4, num_examples=12, epsilon=0.5, train_seconds=3.0, update_bytes=100, loss=0.2)
    encoded = reply.encode()
    assert encoded["accuracy"] == 0.0 and encoded["accuracy_defined"] == 0 and encoded["loss_defined"] == 1
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in encoded.values())  # NaN-free
    assert TrainReply.decode(encoded) == reply and reply.metrics()["accuracy"] is None
    nan = TrainReply(server_round=4, num_examples=1, epsilon=0.0, train_seconds=0.0, update_bytes=0,
                     loss=float("nan")).encode()
    assert nan["loss_defined"] == 0  # a non-finite value is sent as undefined, never as NaN


@pytest.mark.parametrize("change, message", [
    ({"num_examples": 10**15}, "'num_examples' must be in [1, 10000000]"),
    ({"num_examples": 0}, "'num_examples' must be in [1, 10000000]"),
    ({"num_examples": float("nan")}, "'num_examples' must be an integer"),
    ({"num_examples": True}, "'num_examples' must be an integer"),
    ({"epsilon": float("nan")}, "'epsilon' must be finite"),
    ({"epsilon": -0.5}, "'epsilon' must be in [0, 1e+06]"),
    ({"accuracy": 1.01}, "'accuracy' must be in [0, 1]"),
    ({"loss_defined": 2}, "'loss_defined' must be a bool"),
    ({"contract_version": 1}, "contract version 1"),
])
def test_train_reply_decode_refuses(change: dict, message: str) -> None:
    encoded = TrainReply(server_round=4, num_examples=12, epsilon=0.5, train_seconds=3.0, update_bytes=100).encode()
    with pytest.raises(ContractError, match=None) as info:
        TrainReply.decode({**encoded, **change})
    assert message in str(info.value)


def test_eval_reply_shapes_are_checked_against_the_class_list() -> None:
    k = 3
    cm = (2, 0, 0, 0, 1, 0, 0, 0, 1)
    hist = tuple([0] * (2 * k * HIST_BINS))
    hist = list(hist)
    for c in range(k):  # every class block counts the 4 scans once: positives, then the others
        hist[2 * c * HIST_BINS] = 1
        hist[(2 * c + 1) * HIST_BINS] = 3
    reply = EvalReply(server_round=0, num_examples=4, epsilon=0.0, classes_present=3, confusion_matrix=cm,
                      score_histogram=tuple(hist), accuracy=1.0, balanced_accuracy=None)
    assert EvalReply.decode(reply.encode(), num_classes=k) == reply
    with pytest.raises(ContractError, match="'confusion_matrix' has 9 entries; expected 0 or 16"):
        EvalReply.decode(reply.encode(), num_classes=4)
    with pytest.raises(ContractError, match="sums to 5, not num_examples 4"):
        EvalReply.decode({**reply.encode(), "confusion_matrix": [3, 0, 0, 0, 1, 0, 0, 0, 1]}, num_classes=k)
    with pytest.raises(ContractError, match="'score_histogram' of class 0 counts 5 scans, not 4"):
        EvalReply.decode({**reply.encode(), "score_histogram": [2] + hist[1:]}, num_classes=k)
    with pytest.raises(ContractError, match="'classes_present' must be in \\[0, 3\\]"):
        EvalReply.decode({**reply.encode(), "classes_present": 7}, num_classes=k)


def test_query_reply_counts_must_add_up() -> None:
    q = QueryReply(num_unlabelled=3, num_labelled_train=2, num_labelled_val=1, num_labelled_test=1,
                   dp_enabled=True, epsilon=0.1, epsilon_budget=8.0, has_gpu=False)
    assert QueryReply.decode(q.encode()) == q and q.encode()["num_examples"] == 5
    with pytest.raises(ContractError, match="is not num_unlabelled \\+ num_labelled_train"):
        QueryReply.decode({**q.encode(), "num_examples": 9})
    shared = QueryReply(num_unlabelled=0, num_labelled_train=2, num_labelled_val=1, num_labelled_test=1,
                        dp_enabled=False, epsilon=0.0, epsilon_budget=0.0, has_gpu=False, min_count=25,
                        share_local_model=True)
    assert QueryReply.decode(shared.encode()) == shared and (q.min_count, q.share_local_model) == (10, False)
    with pytest.raises(ContractError, match="'min_count' must be in \\[1, "):
        QueryReply.decode({**shared.encode(), "min_count": 0})
    with pytest.raises(ContractError, match="'share_local_model' must be a bool"):
        QueryReply.decode({**shared.encode(), "share_local_model": 2})


def test_round_record_round_trips_and_rejects_foreign_lines() -> None:
    rec = RoundRecord(round=1, phase="pretrain", phase_round=1, phase_rounds=2, step=0,
                      train={"aggregated": {"loss": 0.5, "accuracy": None}, "sites": {"a": {"loss": 0.5}}},
                      evaluate={"aggregated": {}, "sites": {}},
                      participation={"sampled": ["a"], "replied": ["a"], "failed": [], "rejected": []},
                      failures=[], rejected_updates=[], bytes={"down": 1, "up": 2})
    assert RoundRecord.decode(rec.encode()) == rec
    with pytest.raises(ContractError, match="contract version None"):
        RoundRecord.decode({k: v for k, v in rec.encode().items() if k != "contract_version"})
    bad = rec.encode()
    bad["train"] = {"aggregated": {"loss": float("nan")}, "sites": {}}
    with pytest.raises(ContractError, match="metric 'loss' must be a finite number"):
        RoundRecord.decode(bad)
