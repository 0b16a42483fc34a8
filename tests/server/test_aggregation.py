"""Aggregation of updates: weighted mean, trimmed mean and median, with an outlier site."""

from __future__ import annotations

import pytest
import torch

from server.aggregation import aggregate_updates

UPDATES = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(2)},
           {"w": torch.tensor([2.0, 3.0]), "n": torch.tensor(3)},
           {"w": torch.tensor([1000.0, -1000.0]), "n": torch.tensor(4)}]


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


def test_capped_shares_give_no_site_more_than_the_cap() -> None:
    from server.aggregation import capped_shares

    shares = capped_shares([1e15, 5, 5], 0.5)
    assert shares == pytest.approx([0.5, 0.25, 0.25]) and sum(shares) == pytest.approx(1.0)
    shares = capped_shares([1, 1, 1, 97], 0.3)
    assert max(shares) == pytest.approx(0.3) and sum(shares) == pytest.approx(1.0)
    assert capped_shares([3, 1], 0.5) == pytest.approx([0.5, 0.5])
    assert capped_shares([7], 0.5) == [1.0]  # one site: the cap cannot apply
    assert capped_shares([1, 2, 3], 1.0) == pytest.approx([1 / 6, 2 / 6, 3 / 6])  # no cap: example weights
    with pytest.raises(ValueError, match="max-site-share must be in"):
        capped_shares([1, 2], 0.0)
    with pytest.raises(ValueError, match="finite"):
        capped_shares([1, float("nan")], 0.5)
