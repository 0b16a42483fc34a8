"""Streaming aggregation: same result as the hold-everything aggregation, one update at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import server.streaming_aggregation as streaming
from server.aggregation import METHODS, aggregate_updates
from server.streaming_aggregation import StreamingAggregator


def _updates(k: int) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    g = torch.Generator().manual_seed(k)
    ups = [{"enc.w": torch.randn(7, 5, generator=g), "enc.b": torch.randn(5, generator=g),
            "steps": torch.tensor(i, dtype=torch.int64), "head": torch.randn(3, generator=g)} for i in range(k)]
    return ups, [int(w) for w in torch.randint(1, 50, (k,), generator=g)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_matches_hold_everything(method: str, k: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 4 * 8 * k)  # several chunks, one crossing tensor boundaries
    ups, weights = _updates(k)
    expected = aggregate_updates(ups, weights, method, trim=0.2)
    with StreamingAggregator(method, trim=0.2, spool_dir=tmp_path) as agg:
        for u, w in zip(ups, weights, strict=True):
            agg.add(u, w)
        got = agg.result()
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert list(tmp_path.iterdir()) == []  # the spool is gone


def test_robust_spools_to_disk_and_close_removes_it(tmp_path: Path) -> None:
    agg = StreamingAggregator("median", spool_dir=tmp_path)
    ups, _ = _updates(3)
    for u in ups:
        agg.add(u, 1)
    files = list(tmp_path.glob("aggregation-spool-*/*.f32"))
    assert len(files) == 3 and all(f.stat().st_size == 4 * (35 + 5 + 3) for f in files)
    agg.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, message", [
    (lambda a: a.add({"w": torch.ones(3)}, 1), "layout differs from the first one's"),
    (lambda a: a.add({"w": torch.ones(2), "x": torch.ones(1)}, 1), "layout differs"),
    (lambda a: a.add({"w": torch.ones(2)}, -1), "weight -1.0"),
    (lambda a: a.add({"w": torch.ones(2)}, float("nan")), "weight nan"),
])
def test_bad_updates(call, message: str) -> None:
    agg = StreamingAggregator("fedavg")
    agg.add({"w": torch.ones(2)}, 1)
    with pytest.raises(ValueError) as info:
        call(agg)
    assert message in str(info.value)


def test_empty_zero_weights_bad_method_and_result_once() -> None:
    with pytest.raises(ValueError, match="there are no updates"):
        StreamingAggregator("fedavg").result()
    agg = StreamingAggregator("fedavg")
    agg.add({"w": torch.ones(2)}, 0)
    with pytest.raises(ValueError, match="num-examples sum to 0"):
        agg.result()
    with pytest.raises(ValueError, match="must be one of fedavg, fedprox, trimmed-mean, median; got 'mean'"):
        StreamingAggregator("mean")
    agg = StreamingAggregator("fedavg")
    agg.add({"w": torch.ones(2)}, 2)
    assert agg.result()["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="already taken"):
        agg.add({"w": torch.ones(2)}, 1)


@pytest.mark.parametrize("weights, cap", [([1e6, 5, 5, 3], 0.5), ([1, 1, 1, 97, 2], 0.3), ([3, 1], 0.5),
                                          ([1, 2, 3], 0.9), ([7], 0.5)])
def test_capped_shares_match_hold_everything(weights: list[float], cap: float, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With max-site-share the running sum is redone from the spool when the cap binds, same result."""
    from server.aggregation import capped_shares

    monkeypatch.setattr(streaming, "CHUNK_BYTES", 4 * 6)  # several slices per tensor
    ups, _ = _updates(len(weights))
    expected = aggregate_updates(ups, capped_shares(weights, cap), "fedavg")
    with StreamingAggregator("fedavg", spool_dir=tmp_path, max_share=cap) as agg:
        for u, w in zip(ups, weights, strict=True):
            agg.add(u, w)
        assert len(list(tmp_path.glob("aggregation-spool-*/*.f32"))) == len(weights)
        got = agg.result()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"max-site-share must be in \(0, 1\]; got 0"):
        StreamingAggregator("fedavg", max_share=0)


def test_uncapped_fedavg_writes_nothing_to_disk(tmp_path: Path) -> None:
    with StreamingAggregator("fedavg", spool_dir=tmp_path) as agg:
        for u, w in zip(*_updates(3), strict=True):
            agg.add(u, w)
        assert list(tmp_path.iterdir()) == []
        agg.result()
