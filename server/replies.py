"""Replies as they arrive: one pulled at a time, each received buffer freed once decoded.

Flower's ``Grid.send_and_receive`` returns every reply of an exchange at once, so a server that uses it
holds (number of sites) x (update) bytes before it can look at the first. :func:`iter_replies` pushes the
messages and pulls each reply on its own instead, so the caller (``server.strategy``) validates, folds in
and drops one reply before the next is pulled; :func:`take_arrays` decodes a reply's arrays while emptying
its record, so the received bytes and the decoded arrays are not both held for the whole update.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

__all__ = ["POLL_S", "iter_replies", "take_arrays"]

#: Seconds between two polls for replies that have not arrived yet (Flower's own send_and_receive polls a
#: deployment's SuperLink every 3 s). A poll is one local ServerAppIo request per pending site, so 0.2 s
#: costs little and adds 0.1 s on average to an exchange (docs/performance.md, "Deployment round overhead").
POLL_S = 0.2


def iter_replies(grid: Grid, messages: Sequence[Message], timeout: float, poll_s: float = POLL_S) -> Iterator[Message]:
    """Send ``messages`` and yield the replies one at a time as they arrive, until all came or ``timeout``.

    Each reply is pulled on its own (``pull_messages`` of one message id), so the caller holds one reply at
    a time however many sites answered at once; the caller drops it before asking for the next. Late
    replies are left on the SuperLink, as ``send_and_receive`` leaves them. A grid whose ``push_messages``
    raises ``NotImplementedError`` gets ``send_and_receive`` instead.
    """
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


def take_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: array.numpy()}``, emptying ``record`` as it goes: each received buffer is freed once decoded."""
    out = {}
    for name in list(record.keys()):
        out[name] = record[name].numpy()
        del record[name]
    return out
