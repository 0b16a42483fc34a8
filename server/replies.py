"""Models into records, and replies as they arrive: one pulled at a time, each received buffer freed once decoded.

A model or an update travels as one bundle (:func:`state_to_arrays`, ``lungmae_core.bundle``), because
Flower moves each array of a record as its own request.

Flower's ``Grid.send_and_receive`` returns every reply of an exchange at once, so a server that uses it
holds (number of sites) x (update) bytes before it can look at the first. :func:`iter_replies` pushes the
messages and pulls each reply on its own instead, so the caller (``server.strategy``) validates, folds in
and drops one reply before the next is pulled; :func:`take_arrays` decodes a reply's arrays while emptying
its record, so the received bytes and the decoded arrays are not both held for the whole update.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from lungmae_core.bundle import OBJECT_RETRY, bundle, unbundle
from lungmae_core.wire import WireFormatError

__all__ = ["POLL_S", "arrays_to_state", "state_to_arrays", "reply_bytes", "iter_replies",
           "take_arrays", "quick_object_retries"]

log = logging.getLogger(__name__)

#: Seconds between two polls for replies that have not arrived yet (Flower's own send_and_receive polls a
#: deployment's SuperLink every 3 s). A poll is one local ServerAppIo request per pending site, so 0.2 s
#: costs little and adds 0.1 s on average to an exchange (docs/performance.md, "Deployment round overhead").
POLL_S = 0.2


def arrays_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A received bundle record -> name -> NumPy array (no dtype change; ``WireFormatError`` if malformed)."""
    return unbundle({k: v.numpy() for k, v in record.items()})


def state_to_arrays(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """name -> tensor/array -> one bundle ArrayRecord (layout + payload parts) keeping each dtype (bfloat16 -> float32).

    One bundle rather than one array per tensor: Flower moves each array as its own request
    (``lungmae_core.bundle``).
    """
    arrays = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        arrays[k] = v
    return ArrayRecord(array_dict={k: Array(v) for k, v in bundle(arrays).items()})


def reply_bytes(reply: Message) -> int:
    """Payload bytes of a reply (arrays, metrics, configs), counted from the records' sizes, before decoding."""
    if not reply.has_content():
        return 0
    c = reply.content
    return (sum(r.count_bytes() for r in c.array_records.values())
            + sum(r.count_bytes() for r in c.metric_records.values())
            + sum(r.count_bytes() for r in c.config_records.values()))


def iter_replies(grid: Grid, messages: Sequence[Message], timeout: float, poll_s: float = POLL_S) -> Iterator[Message]:
    """Send ``messages`` and yield the replies one at a time as they arrive, until all came or ``timeout``.

    Each reply is pulled on its own (``pull_messages`` of one message id), so the caller holds one reply at
    a time however many sites answered at once; the caller drops it before asking for the next. Late
    replies are left on the SuperLink, as ``send_and_receive`` leaves them. A grid whose ``push_messages``
    raises ``NotImplementedError`` gets ``send_and_receive`` instead.
    """
    quick_object_retries()
    try:  # pushed now, so that every message has its id when this returns
        ids = [str(i) for i in grid.push_messages(messages)]
    except NotImplementedError:
        return iter(grid.send_and_receive(messages, timeout=timeout))
    return _pull_one_by_one(grid, ids, timeout, poll_s)


def _pull_one_by_one(grid: Grid, ids: Sequence[str], timeout: float, poll_s: float) -> Iterator[Message]:
    pending = list(dict.fromkeys(ids))
    end = time.monotonic() + timeout
    while pending:
        for mid in list(pending):
            for reply in grid.pull_messages([mid]):
                if reply.metadata.reply_to_message_id in pending:
                    pending.remove(reply.metadata.reply_to_message_id)
                yield reply
                del reply
        if not pending or time.monotonic() >= end:
            return
        time.sleep(min(poll_s, max(0.0, end - time.monotonic())))


def quick_object_retries() -> bool:
    """Make the deployment grid of this ServerApp process retry an incomplete reply's objects sooner.

    Replaces the ``pull_objects`` that Flower 1.42's ``http_grid`` calls with the same function bound to a
    shorter first pause (``lungmae_core.bundle.OBJECT_RETRY``: a reply is listed before its objects, and
    Flower's 1 s first pause cost ~1 s of every round, docs/performance.md, "Deployment round overhead");
    idempotent. Returns whether the grid now uses it; with
    another Flower layout nothing is changed (logged once), and replies arrive as before, only later.
    """
    try:
        from flwr.supercore.inflatable.inflatable_utils import pull_objects
        from flwr.superlink.grid import http_grid
    except ImportError:
        log.info("this Flower has no http_grid.pull_objects: its own object retry pauses apply")
        return False
    current = getattr(http_grid, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is pull_objects:
        return True
    if current is not pull_objects:
        log.info("this Flower's http_grid does not call pull_objects: its own object retry pauses apply")
        return False
    http_grid.pull_objects = functools.partial(pull_objects, **OBJECT_RETRY)  # type: ignore[attr-defined]
    return True


def take_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: array}``, emptying ``record`` as it goes; each array is a read-only view of the received bytes.

    Flower's ``Array.numpy()`` copies the bytes (``np.load``), so a reply would briefly be held twice; the
    ``.npy`` header is read here instead and the array points into the bytes that arrived (no pickle is
    ever loaded: an object dtype is refused).

    Raises:
        WireFormatError: an array that is not a ``.npy`` serialisation of a plain dtype.
    """
    out = {}
    for name in list(record.keys()):
        out[name] = _npy_view(name, record[name])
        del record[name]
    return out


def _npy_view(name: str, array: Array) -> np.ndarray:
    data = array.data
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy version {version} (1.0 and 2.0 are read)")
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise WireFormatError(f"Unable to read array {name!r} as it is not a .npy serialisation: {exc}") from None
    if dtype.hasobject:
        raise WireFormatError(f"Unable to read array {name!r} as its dtype {dtype} holds Python objects")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise WireFormatError(f"Unable to read array {name!r} as it declares {count * dtype.itemsize} bytes "
                              f"but carries {len(data) - offset}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")
