"""Wire packing: round trips per compression, exact byte counts, layouts, deltas, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungmae_core.wire import (
    SCALE_SUFFIX, WireFormatError, apply_delta, pack_state, packed_layout, packed_nbytes, select, state_delta,
    state_nbytes, unpack_state, update_norm,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g) * 0.05, "b": torch.randn(8, generator=g),
            "steps": torch.tensor(3, dtype=torch.int64)}


@pytest.mark.parametrize("compression, float_bytes, tol", [("fp32", 4, 0.0), ("fp16", 2, 1e-3), ("int8", 1, 1e-2)])
def test_round_trip_and_bytes(compression: str, float_bytes: int, tol: float) -> None:
    state = _state()
    packed = pack_state(state, compression)
    scales = 2 * 4 if compression == "int8" else 0  # one float32 scale per floating tensor
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


@pytest.mark.parametrize("call, message", [
    (lambda: pack_state({"w": torch.ones(1)}, "bf16"), "compression must be one of fp32, fp16, int8; got 'bf16'"),
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
