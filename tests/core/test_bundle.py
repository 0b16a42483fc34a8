"""Bundles: every packed array in a layout and a few payload parts, and a malformed bundle refused unread."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import lungmae_core.bundle
from lungmae_core.bundle import BUNDLE_KEYS, MAX_LAYOUT_BYTES, bundle, layout_nbytes, payload_nbytes, unbundle
from lungmae_core.wire import WireFormatError, pack_state, packed_nbytes


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"enc.w": torch.randn(16, 8), "enc.b": torch.randn(8), "steps": torch.tensor(3)}


@pytest.mark.parametrize("compression", ["fp32", "fp16", "int8", "topk"])
def test_a_bundle_carries_every_packed_array_exactly_in_a_layout_and_one_payload(compression: str) -> None:
    state = {**_state(), "empty": torch.zeros(0, 3), "odd": torch.randn(3, 1, 5)}
    packed = pack_state(state, compression)
    arrays = bundle(packed)
    assert list(arrays) == list(BUNDLE_KEYS) and all(a.dtype == np.uint8 and a.ndim == 1 for a in arrays.values())
    back = unbundle(arrays)
    assert list(back) == list(packed)  # the packed order, names, shapes, dtypes and bytes
    for name, value in packed.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        assert np.array_equal(back[name], value) and not back[name].flags.writeable
    # only alignment padding beside the values (each array starts at a multiple of 8)
    assert packed_nbytes(packed) <= arrays["payload"].size < packed_nbytes(packed) + 8 * len(packed)


def _layout(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).copy()


@pytest.mark.parametrize("arrays, message", [
    ({"payload": np.zeros(8, np.uint8)}, "exactly the arrays 'layout' and 'payload'"),
    ({"payload": np.zeros(8, np.uint8), "layout": _layout("[]")}, "exactly the arrays"),  # order matters too
    ({"layout": _layout('[["w",[2],"float32"]]'), "payload": np.zeros(16, np.uint8)},
     "adds up to 8 bytes but the payload has 16"),
    ({"layout": _layout('[["w",[2],"float32"]]'), "payload": np.zeros(8, np.float32)}, "not 1-D uint8"),
    ({"layout": _layout('[["w",[2],"float32"]]'), "payload": np.zeros((2, 4), np.uint8)}, "not 1-D uint8"),
    ({"layout": _layout('[["w",[-2],"float32"]]'), "payload": np.zeros(0, np.uint8)}, "layout entry 0"),
    ({"layout": _layout('[["w",[2.5],"float32"]]'), "payload": np.zeros(8, np.uint8)}, "layout entry 0"),
    ({"layout": _layout('[["w",[true],"float32"]]'), "payload": np.zeros(8, np.uint8)}, "layout entry 0"),
    ({"layout": _layout('[["w",[1,1,1,1,1,1,1,1,1],"float32"]]'), "payload": np.zeros(8, np.uint8)},
     "layout entry 0"),
    ({"layout": _layout('[["w",[2],"O"]]'), "payload": np.zeros(16, np.uint8)}, "is not one of"),
    ({"layout": _layout('[["w",[2],"<f4"]]'), "payload": np.zeros(8, np.uint8)}, "is not one of"),
    ({"layout": _layout('[["", [0], "float32"]]'), "payload": np.zeros(0, np.uint8)}, "empty, over-long or repeated"),
    ({"layout": _layout('{"w": [2]}'), "payload": np.zeros(8, np.uint8)}, "not a JSON list"),
    ({"layout": _layout('[["w",[1099511627775,1099511627775],"float64"]]'), "payload": np.zeros(8, np.uint8)},
     "adds up to"),
    ({"layout": np.zeros(8, np.int64), "payload": np.zeros(0, np.uint8)}, "not 1-D uint8"),
])
def test_a_malformed_bundle_is_rejected_before_any_value_is_read(arrays, message: str) -> None:
    with pytest.raises(WireFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        unbundle(arrays)


def test_an_oversized_layout_is_rejected_unparsed() -> None:
    with pytest.raises(WireFormatError, match="over"):
        unbundle({"layout": np.full(MAX_LAYOUT_BYTES + 1, ord(" "), np.uint8), "payload": np.zeros(0, np.uint8)})


def test_bundling_refuses_arrays_that_hold_objects() -> None:
    with pytest.raises(WireFormatError, match="dtype object"):
        bundle({"w": np.array([{}], dtype=object)})


def test_a_large_model_travels_in_parts_that_the_receiver_derives_itself(monkeypatch) -> None:
    monkeypatch.setattr(lungmae_core.bundle, "PART_BYTES", 64)
    packed = {"a": np.arange(10, dtype=np.float32), "b": np.arange(3, dtype=np.int64),  # 40 + 24 bytes: one part
              "big": np.ones(40, np.float32), "c": np.zeros(2, np.float16)}  # 160 bytes alone; then a part for c
    arrays = bundle(packed)
    assert list(arrays) == ["layout", "payload", "payload-1", "payload-2"]
    assert [arrays[k].size for k in ("payload", "payload-1", "payload-2")] == [64, 160, 8]
    back = unbundle(arrays)
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in packed.items())
    without_last = {k: v for k, v in arrays.items() if k != "payload-2"}
    expected = r"calls for the arrays \['layout', 'payload', 'payload-1', 'payload-2'\]"
    with pytest.raises(WireFormatError, match=expected):
        unbundle(without_last)
    with pytest.raises(WireFormatError, match="calls for the arrays"):
        unbundle({**arrays, "payload-3": np.zeros(8, np.uint8)})
    with pytest.raises(WireFormatError, match="adds up to 160 bytes but 'payload-1' has 168"):
        unbundle({**arrays, "payload-1": np.zeros(168, np.uint8)})


def _int8_update(n: int = 50_000) -> dict[str, np.ndarray]:
    """An int8 update as pack_state makes one: codes peaked at zero, as a trained update's are."""
    g = np.random.default_rng(0)
    return {"w": np.clip(np.round(g.normal(0, 25, n)), -127, 127).astype(np.int8),
            "w#int8-scale": g.random(-(-n // 1024)).astype(np.float32), "steps": np.array(3, np.int64)}


def test_a_deflated_bundle_is_smaller_and_comes_back_exactly() -> None:
    packed = _int8_update()
    plain, deflated = bundle(packed), bundle(packed, deflate=True)
    assert list(deflated) == list(plain) and np.array_equal(deflated["layout"], plain["layout"])
    assert payload_nbytes(deflated) < 0.9 * payload_nbytes(plain)
    back = unbundle(deflated, deflate=True, max_bytes=payload_nbytes(plain))
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in packed.items())
    assert unbundle(bundle({"e": np.zeros(0, np.int8)}, deflate=True), deflate=True)["e"].shape == (0,)


def test_a_forged_deflated_part_is_refused_before_it_can_cost_more_than_an_honest_one() -> None:
    packed = _int8_update()
    good = bundle(packed, deflate=True)
    layout, payload = good["layout"], good["payload"]
    cases = {
        "cut short": {"layout": layout, "payload": payload[:-3]},
        "has data after its end": {"layout": layout, "payload": np.concatenate([payload, np.zeros(4, np.uint8)])},
        "not a deflate stream": {"layout": layout, "payload": np.full(payload.size, 7, np.uint8)},
        # string matching makes a few bytes of zeros stand for the whole payload: more than 8x is refused unread
        "at least 1/8 of its length": {"layout": layout, "payload": np.frombuffer(
            zlib.compress(bytes(payload_nbytes(bundle(packed))), 9), np.uint8)},
        "inflates to 10000 bytes": {"layout": layout, "payload": np.frombuffer(
            zlib.compress(np.random.default_rng(1).bytes(10_000)), np.uint8)},
        "over the 1000 expected": dict(good),  # a layout larger than the update the receiver expects
        "exactly the arrays": {"layout": layout},
    }
    for message, arrays in cases.items():
        with pytest.raises(WireFormatError, match=message):
            unbundle(arrays, deflate=True, max_bytes=1000 if message.startswith("over") else None)
    with pytest.raises(WireFormatError, match="adds up to"):  # the receiver, not the sender, says "deflated"
        unbundle(good)


def test_layout_nbytes_is_what_the_parts_add_up_to() -> None:
    from lungmae_core.wire import packed_layout

    state = {"w": torch.zeros(3, 5), "b": torch.zeros(7), "n": torch.tensor(2)}
    for compression in ("fp32", "fp16", "int8", "topk"):
        packed = pack_state(state, compression)
        assert layout_nbytes(packed_layout(state, compression)) == payload_nbytes(bundle(packed))
