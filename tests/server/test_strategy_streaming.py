"""The strategy on a grid with push/pull: replies pulled one at a time and folded in as they arrive."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from server.strategy import PhaseStrategy, iter_replies
from tests.federated_helpers import InProcessGrid
from tests.server.test_strategy import CFG, GLOBAL, _app, _registry

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class PushPullGrid(InProcessGrid):
    """Runs a node's ClientApp when its reply is pulled; records how many replies each pull returned.

    ``silent`` nodes never reply (a site that is down); ``send_and_receive`` must not be used.
    """

    def __init__(self, *args, silent: Iterable[int] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Message] = {}
        self.pulled: list[int] = []
        self.silent = set(silent)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.sent.append(msg)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in message_ids:
            msg = self.pending.get(mid)
            if msg is None or msg.metadata.dst_node_id in self.silent:
                continue
            del self.pending[mid]
            delivered = copy.deepcopy(msg)
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            out.append(reply)
        self.pulled.append(len(out))
        return out

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the strategy must pull replies one at a time on a grid that can")


@pytest.mark.parametrize("method", ["fedavg", "median"])
def test_push_pull_round_equals_send_and_receive_round(method: str) -> None:
    ref_grid = InProcessGrid(_app(), [{"partition-id": i} for i in range(3)])
    ref, _ = PhaseStrategy(CFG, _registry(ref_grid), method=method, max_norm=10.0,
                           max_site_share=0.5).train_round(ref_grid, GLOBAL, CFG, timeout=5)
    grid = PushPullGrid(_app(), [{"partition-id": i} for i in range(3)])
    sites = _registry(InProcessGrid(_app(), [{"partition-id": i} for i in range(3)]))
    new, report = PhaseStrategy(CFG, sites, method=method, max_norm=10.0,
                                max_site_share=0.5).train_round(grid, GLOBAL, CFG, timeout=5)
    assert report.replied == ["s0", "s1"] and report.aggregated["num_examples"] == 3
    assert max(grid.pulled) == 1  # never more than one reply in hand
    for name in GLOBAL:
        assert torch.allclose(new[name], ref[name]), name
    assert np.allclose(new["w"].numpy(), 0.15 if method == "median" else 0.5 * 0.1 + 0.5 * 0.2)


def test_a_silent_site_times_out_and_the_others_are_aggregated() -> None:
    grid = PushPullGrid(_app(), [{"partition-id": i} for i in range(2)], silent={102})
    sites = _registry(InProcessGrid(_app(), [{"partition-id": i} for i in range(2)]))
    new, report = PhaseStrategy(CFG, sites, max_norm=10.0, max_site_share=1.0).train_round(
        grid, GLOBAL, CFG, timeout=0.3)
    assert report.failed == [{"site": "s1", "reason": "no reply within round-timeout-s"}]
    assert np.allclose(new["w"].numpy(), 0.1)


def test_iter_replies_yields_lazily() -> None:
    """The second reply is not pulled before the caller is done with the first."""
    grid = PushPullGrid(_app(), [{"partition-id": 0}, {"partition-id": 1}])
    from flwr.app import ConfigRecord, RecordDict

    msgs = [Message(RecordDict({"config": ConfigRecord(CFG.encode())}), dst_node_id=n, message_type="query")
            for n in (101, 102)]
    it = iter_replies(grid, msgs, timeout=5)
    first = next(it)
    assert first.metadata.src_node_id == 101 and len(grid.pending) == 1
    assert next(it).metadata.src_node_id == 102 and not grid.pending
    assert list(it) == []


def test_take_arrays_points_into_the_received_bytes_and_empties_the_record() -> None:
    from flwr.app import Array, ArrayRecord

    from server.replies import take_arrays

    values = {"layout": np.arange(5, dtype=np.uint8), "payload": np.arange(12, dtype=np.float32).reshape(3, 4)}
    record = ArrayRecord(array_dict={k: Array(v) for k, v in values.items()})
    data = record["payload"].data
    got = take_arrays(record)
    assert len(record) == 0 and list(got) == ["layout", "payload"]
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in values.items())
    assert np.shares_memory(got["payload"], np.frombuffer(data, np.uint8))  # no copy of the reply


def _npy(header: dict, body: bytes) -> bytes:
    import io

    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue() + body


@pytest.mark.parametrize("data, message", [
    (b"not an npy file", "not a .npy serialisation"),
    (_npy({"descr": "<f4", "fortran_order": False, "shape": (1000,)}, b"\0" * 16),
     "declares 4000 bytes but carries 16"),
    (_npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\0" * 8), "holds Python objects"),
])
def test_take_arrays_refuses_what_is_not_a_plain_npy_array(data: bytes, message: str) -> None:
    from flwr.app import Array, ArrayRecord

    from lungmae_core.wire import WireFormatError
    from server.replies import take_arrays

    record = ArrayRecord(array_dict={"payload": Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=data)})
    with pytest.raises(WireFormatError, match=message):
        take_arrays(record)


def test_the_deployment_grid_retries_an_incomplete_reply_sooner_with_the_same_patience() -> None:
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.superlink.grid import http_grid

    from lungmae_core.bundle import OBJECT_RETRY
    from server.replies import quick_object_retries

    original = http_grid.pull_objects
    try:
        assert quick_object_retries() and quick_object_retries()  # idempotent
        bound = http_grid.pull_objects
        assert bound.func is pull_objects and bound.keywords == OBJECT_RETRY and OBJECT_RETRY["initial_backoff"] <= 0.1
        cap, tries = bound.keywords["backoff_cap"], bound.keywords["max_tries_per_object"]
        assert cap * tries >= 10 * 500  # Flower's default patience: 500 tries, up to 10 s apart
    finally:
        http_grid.pull_objects = original
