"""Update checks: each bad update is rejected by the right check, with the site named, values never."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungmae_core.wire import pack_state, packed_layout
from server.update_checks import UpdateRejected, validate_update

GLOBAL = {"enc.w": torch.zeros(4, 3), "head.b": torch.zeros(2)}


def _packed(**changes: np.ndarray) -> dict[str, np.ndarray]:
    packed = pack_state({k: torch.full_like(v, 0.01) for k, v in GLOBAL.items()}, "fp16")
    packed.update(changes)
    return packed


@pytest.mark.parametrize("packed, check, detail", [
    ({k: v for k, v in _packed().items() if k != "head.b"}, "names", "1 missing ('head.b')"),
    (_packed(**{"extra": np.zeros(1, np.float16)}), "names", "1 unexpected ('extra')"),
    (_packed(**{"enc.w": np.zeros((3, 4), np.float16)}), "shapes", "enc.w (3, 4) != (4, 3)"),
    (_packed(**{"enc.w": np.zeros((4, 3), np.float32)}), "dtypes", "enc.w float32 != float16"),
    (_packed(**{"head.b": np.array([np.nan, 0], np.float16)}), "finite", "non-finite values in 'head.b'"),
    (_packed(**{"enc.w": np.full((4, 3), 500, np.float16)}), "norm", "exceeds the bound 100"),
])
def test_rejections(packed: dict, check: str, detail: str) -> None:
    with pytest.raises(UpdateRejected) as info:
        validate_update("hospital-b", packed, packed_layout(GLOBAL, "fp16"), max_norm=100.0)
    assert info.value.check == check and info.value.site == "hospital-b"
    assert detail in str(info.value) and str(info.value).startswith("update from site 'hospital-b' rejected by the")


@pytest.mark.parametrize("compression", ["fp32", "fp16", "int8"])
def test_valid_update_decoded(compression: str) -> None:
    update = {k: torch.full_like(v, 0.5) for k, v in GLOBAL.items()}
    delta = validate_update("a", pack_state(update, compression), packed_layout(GLOBAL, compression), 10.0)
    assert all(torch.allclose(delta[k], update[k], atol=1e-2) and delta[k].dtype == torch.float32 for k in GLOBAL)


def test_int8_with_infinite_scale_is_not_finite() -> None:
    packed = pack_state({"enc.w": torch.full((4, 3), float("inf")), "head.b": torch.zeros(2)}, "int8")
    with pytest.raises(UpdateRejected, match="finite check"):
        validate_update("a", packed, packed_layout(GLOBAL, "int8"), 10.0)


def test_topk_update_declaring_a_smaller_shape_is_rejected() -> None:
    """A top-k update carries its own shape; with the global shapes given, a lie is caught before aggregation."""
    state = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    packed = pack_state({"w": torch.full((4, 3), 1e-3), "b": torch.full((1,), 1e-3)}, "topk")
    layout = packed_layout(state, "topk")
    packed["b"], packed["b#topk-index"] = packed["b"].repeat(1), packed["b#topk-index"].repeat(1)
    with pytest.raises(UpdateRejected, match="decodes to shape"):
        validate_update("a", packed, layout, 10.0, shapes={k: tuple(v.shape) for k, v in state.items()})


def test_a_valid_update_is_decoded_when_read_not_held_decoded() -> None:
    """The checked update keeps the received arrays and decodes an entry on each read (memory: one tensor)."""
    update = {k: torch.full_like(v, 0.25) for k, v in GLOBAL.items()}
    packed = pack_state(update, "int8")
    delta = validate_update("a", packed, packed_layout(GLOBAL, "int8"), 10.0)
    assert list(delta) == list(GLOBAL) and len(delta) == 2
    assert delta.layout == {"enc.w": ((4, 3), torch.float32), "head.b": ((2,), torch.float32)}
    assert delta.norm == pytest.approx(0.25 * np.sqrt(14), rel=1e-2)
    first, second = delta["enc.w"], delta["enc.w"]
    assert first is not second and first.data_ptr() != second.data_ptr()  # a fresh tensor per read
    first.add_(1.0)  # the caller may use it in place; the update is unchanged
    assert torch.allclose(delta["enc.w"], torch.full((4, 3), 0.25), atol=1e-2)
    delta.scale_by(0.5)
    assert torch.allclose(delta["head.b"], torch.full((2,), 0.125), atol=1e-2)
    with pytest.raises(KeyError):
        delta["enc.w#int8-scale"]
