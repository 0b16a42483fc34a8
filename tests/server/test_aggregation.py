"""Aggregation of updates: weighted mean, trimmed mean and median, with an outlier site."""

from __future__ import annotations

import pytest
import torch

from server.aggregation import aggregate_updates

UPDATES = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(2)},
           {"w": torch.tensor([2.0, 3.0]), "n": torch.tensor(3)}, {"w": torch.tensor([1000.0, -1000.0]), "n": torch.tensor(4)}]


@pytest.mark.parametrize("method, weights, expected", [
    ("fedavg", [1, 1, 2, 0], [2.0, 3.0]),
    ("fedprox", [1, 0, 0, 0], [1.0, 2.0]),
    ("median", [1, 1, 1, 1], [2.5, 2.5]),
    ("trimmed-mean", [1, 1, 1, 1], [2.5, 2.5]),
])
def test_methods(method: str, weights: list[float], expected: list[float]) -> None:
    out = aggregate_updates(UPDATES, weights, method, trim=0.25)
    assert torch.allclose(out["w"], torch.tensor(expected)) and int(out["n"]) == 1


def test_trim_zero_is_plain_mean_and_errors() -> None:
    out = aggregate_updates(UPDATES[:3], [1, 1, 1], "trimmed-mean", trim=0.0)
    assert torch.allclose(out["w"], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="there are no updates"):
        aggregate_updates([], [], "fedavg")
    with pytest.raises(ValueError, match="num-examples sum to 0"):
        aggregate_updates(UPDATES[:1], [0], "fedavg")
    with pytest.raises(ValueError, match="must be one of fedavg, fedprox, trimmed-mean, median; got 'krum'"):
        aggregate_updates(UPDATES[:1], [1], "krum")
