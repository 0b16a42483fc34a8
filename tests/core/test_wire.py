"""Wire packing: round trips per compression, exact byte counts, layouts, deltas, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungmae_core.wire import (
    INDEX_SUFFIX,
    INT8_BLOCK,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    TOPK_FRACTION,
    WireFormatError,
    apply_delta,
    down_compression,
    pack_state,
    packed_layout,
    packed_nbytes,
    select,
    squared_norm,
    state_delta,
    state_nbytes,
    unpack_state,
    update_norm,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g) * 0.05, "b": torch.randn(8, generator=g),
            "steps": torch.tensor(3, dtype=torch.int64)}


@pytest.mark.parametrize("compression, float_bytes, tol", [("fp32", 4, 0.0), ("fp16", 2, 1e-3), ("int8", 1, 1e-2)])
def test_round_trip_and_bytes(compression: str, float_bytes: int, tol: float) -> None:
    state = _state()
    packed = pack_state(state, compression)
    scales = 2 * 4 if compression == "int8" else 0  # one float32 scale per block; each tensor is one block
    assert packed_nbytes(packed) == (16 * 8 + 8) * float_bytes + 8 + scales
    back = unpack_state(packed)
    assert back["steps"].dtype == torch.int64 and int(back["steps"]) == 3
    for k in ("w", "b"):
        assert back[k].dtype == torch.float32
        peak = float(state[k].abs().max())
        assert float((back[k] - state[k]).abs().max()) <= tol * max(peak, 1.0)
    layout = packed_layout(state, compression)
    assert layout == {k: (tuple(v.shape), str(v.dtype)) for k, v in packed.items()}


def test_fp16_halves_fp32() -> None:
    state = {"w": torch.ones(768, 768)}
    assert packed_nbytes(pack_state(state, "fp16")) * 2 == state_nbytes(state)


def test_int8_keeps_non_finite_visible() -> None:
    back = unpack_state(pack_state({"w": torch.tensor([1.0, float("nan")])}, "int8"))
    assert not torch.isfinite(back["w"]).all()


def test_delta_apply_norm() -> None:
    base = _state()
    new = {k: (v + 1 if v.is_floating_point() else v + 1) for k, v in base.items()}
    delta = state_delta(new, base)
    assert torch.allclose(delta["w"], torch.ones(16, 8))
    assert update_norm(delta) == pytest.approx((16 * 8 + 8) ** 0.5)
    out = apply_delta(base, delta)
    assert torch.allclose(out["b"], new["b"]) and int(out["steps"]) == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_squared_norm_over_chunks_is_the_float64_sum(dtype: torch.dtype) -> None:
    # more values than one float64 chunk, not a multiple of it, in a non-contiguous view
    g = torch.Generator().manual_seed(1)
    value = (torch.randn(3, (1 << 20) + 1234, generator=g) * 10).to(dtype).t()
    assert squared_norm(value) == pytest.approx(float((value.double() ** 2).sum()), rel=1e-12)
    assert squared_norm(torch.zeros(0)) == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda: pack_state({"w": torch.ones(1)}, "bf16"), "compression must be one of fp32, fp16, int8, topk; got 'bf16'"),
    (lambda: pack_state({"w" + INDEX_SUFFIX: torch.ones(1)}, "topk"), "are reserved"),
    (lambda: unpack_state({"w": np.ones(2, np.int8), "w" + SCALE_SUFFIX: np.ones(3, np.float32)}),
     "its scale has 3 values, not 1 or 1"),
    (lambda: unpack_state({"w": np.ones(2, np.float16), "w" + INDEX_SUFFIX: np.array([0, 9], np.int32),
                           "w" + SHAPE_SUFFIX: np.array([4], np.int64)}), "a top-k position lies outside its 4"),
    (lambda: unpack_state({"w": np.ones(2, np.float16), "w" + INDEX_SUFFIX: np.array([0, 1], np.int32)}),
     "it needs both"),
    (lambda: unpack_state({"w" + INDEX_SUFFIX: np.array([0], np.int32)}), "its top-k array is missing"),
    (lambda: unpack_state(pack_state({"b": torch.ones(1)}, "topk"), shapes={"b": (768,)}),
     "it decodes to shape (1,), not (768,)"),  # a declared smaller tensor would broadcast in a sum
    (lambda: pack_state({"w" + SCALE_SUFFIX: torch.ones(1)}, "fp16"), "are reserved"),
    (lambda: unpack_state({"w": np.ones(2, np.float32), "w" + SCALE_SUFFIX: np.ones(1, np.float32)}),
     "has a scale but dtype float32, not int8"),
    (lambda: unpack_state({"w" + SCALE_SUFFIX: np.ones(1, np.float32)}), "its int8 array is missing"),
    (lambda: select({"a": torch.ones(1)}, ["a", "b"]), "the state has no ['b']"),
    (lambda: apply_delta({"a": torch.ones(1)}, {"z": torch.ones(1)}), "the model has no such key"),
])
def test_bad_input(call, message: str) -> None:
    with pytest.raises(WireFormatError, match=None) as info:
        call()
    assert message in str(info.value)


def test_int8_blocks_keep_small_values_beside_an_outlier() -> None:
    """Per-block scales: an outlier in one block does not zero the small values of the other blocks."""
    x = torch.full((3 * INT8_BLOCK,), 1e-3)
    x[0] = 100.0
    packed = pack_state({"w": x}, "int8")
    assert packed["w" + SCALE_SUFFIX].shape == (3,)
    back = unpack_state(packed)["w"]
    assert float(back[0]) == pytest.approx(100.0)
    assert torch.allclose(back[INT8_BLOCK:], x[INT8_BLOCK:], rtol=1e-2)  # per tensor they would be 0
    assert float(back[1]) == 0.0  # same block as the outlier: below its step


def test_int8_is_a_quarter_of_fp32_plus_scales() -> None:
    state = {"w": torch.randn(768, 768) * 1e-3}
    assert packed_nbytes(pack_state(state, "int8")) == 768 * 768 + 4 * (768 * 768 // INT8_BLOCK)
    assert packed_nbytes(pack_state(state, "int8")) / state_nbytes(state) < 0.2511


def test_int8_legacy_per_tensor_scale_still_decodes() -> None:
    back = unpack_state({"w": np.array([1, -2], np.int8), "w" + SCALE_SUFFIX: np.array([0.5], np.float32)})
    assert back["w"].tolist() == [0.5, -1.0]


def test_topk_keeps_the_largest_values_exactly_where_they_were() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 50, generator=g)
    packed = pack_state({"w": x, "n": torch.tensor(7)}, "topk")
    k = int(np.ceil(TOPK_FRACTION * x.numel()))
    assert packed["w"].shape == (k,) and packed["w"].dtype == np.float16
    assert packed["w" + INDEX_SUFFIX].dtype == np.int32 and packed["w" + SHAPE_SUFFIX].tolist() == [20, 50]
    back = unpack_state(packed)["w"]
    assert back.shape == x.shape and int((back != 0).sum()) == k
    kept = back != 0
    assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())  # the k largest magnitudes
    assert torch.allclose(back[kept], x[kept], rtol=1e-3)
    layout = packed_layout({"w": x, "n": torch.tensor(7)}, "topk")
    assert layout == {k_: (tuple(v.shape), str(v.dtype)) for k_, v in packed.items()}
    share = packed_nbytes(pack_state({"w": torch.randn(1000, 100)}, "topk")) / (1000 * 100 * 4)
    assert share == pytest.approx(0.15, abs=1e-3)  # + the shape entry


def test_topk_keeps_non_finite_visible() -> None:
    x = torch.zeros(100)
    x[37] = float("nan")
    assert torch.isnan(unpack_state(pack_state({"w": x}, "topk"))["w"][37])


def test_the_global_goes_down_in_fp32_only_for_fp32_runs() -> None:
    assert [down_compression(c) for c in ("fp32", "fp16", "int8", "topk")] == ["fp32", "fp16", "fp16", "fp16"]
    with pytest.raises(WireFormatError, match="compression must be one of"):
        down_compression("bf16")
