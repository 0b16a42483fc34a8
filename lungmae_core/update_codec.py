"""The wire between a site and the server, for federations run in one process (the experiment harness).

A deployed round compresses twice: the server sends the global model as fp16 (fp32 when the run's
``compression`` is ``fp32``), and a site sends back ``local - received`` packed with the run's compression,
through :class:`~lungmae_core.error_feedback.ErrorFeedback` when the encoding is lossy (``int8``, ``topk``),
as ``client/client_app.py`` does, in one bundle (deflated for ``int8``, :mod:`lungmae_core.bundle`); the
server adds the example-weighted mean of the decoded updates to its fp32 global. :class:`UpdateCodec` does
exactly these steps with the same functions (:func:`~lungmae_core.wire.pack_state`,
:func:`~lungmae_core.wire.unpack_state`, ``ErrorFeedback``, the bundle), so an
in-process FedAvg (:mod:`lungmae_core.experiment.federation`) can measure what a compression costs in
accuracy, and counts the bytes each site would send.

Each site keeps its own error-feedback residual (a file per site under a private temporary directory,
removed by :meth:`UpdateCodec.close`), tagged with the phase, as a site's state directory holds it.

Examples:
    >>> import torch
    >>> with UpdateCodec("int8") as codec:
    ...     glob = {"w": torch.zeros(4096)}
    ...     received = codec.received(glob)
    ...     new = codec.site_update(0, {"w": torch.full((4096,), 0.01)}, received, glob)
    ...     round(float(new["w"][0]), 3), codec.sent_fraction() < 0.25
    (0.01, True)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

from lungmae_core.bundle import DEFLATED, bundle, payload_nbytes, unbundle
from lungmae_core.error_feedback import ErrorFeedback
from lungmae_core.wire import COMPRESSIONS, apply_delta, pack_state, packed_nbytes, state_delta, unpack_state

__all__ = ["UpdateCodec", "LOSSY"]

log = logging.getLogger(__name__)

#: Encodings that drop part of an update, so a site carries the rest over with error feedback.
LOSSY: tuple[str, ...] = ("int8", "topk")


class UpdateCodec:
    """Encode and decode each site's update as a deployed round does; count the bytes sent.

    Args:
        compression: one of :data:`lungmae_core.wire.COMPRESSIONS`.
        tag: the error-feedback tag (a new tag, e.g. another phase, starts every site's residual afresh).

    Raises:
        ValueError: an unknown compression.
    """

    def __init__(self, compression: str, tag: str = "") -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}")
        self.compression = compression
        self.tag = tag
        self._dir = Path(tempfile.mkdtemp(prefix="update-codec-"))
        #: payload bytes of every update sent so far, and what fp32 would have taken
        self.bytes_sent: list[int] = []
        self.bytes_fp32: list[int] = []

    def received(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global model as a site decodes it (fp16-rounded unless the compression is fp32)."""
        return unpack_state(pack_state(global_state, "fp32" if self.compression == "fp32" else "fp16"))

    def site_update(self, site: int | str, local: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                    global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``global + decode(encode(local - received))``: site ``site``'s model as the server sees it.

        Averaging these with example weights is the server's ``global + mean(update)``.
        """
        update = state_delta(local, received)
        if self.compression in LOSSY:
            packed = ErrorFeedback(self._dir / f"site-{site}", tag=self.tag).pack(update, self.compression)
        else:
            packed = pack_state(update, self.compression)
        deflate = self.compression in DEFLATED
        arrays = bundle(packed, deflate=deflate)  # what travels, deflated where the compression is
        self.bytes_sent.append(payload_nbytes(arrays))
        self.bytes_fp32.append(packed_nbytes(pack_state(update, "fp32")))
        return apply_delta(global_state, unpack_state(unbundle(arrays, deflate=deflate)))

    def sent_fraction(self) -> float:
        """Bytes sent so far as a share of the fp32 bytes of the same updates (0 before any update)."""
        total = sum(self.bytes_fp32)
        return sum(self.bytes_sent) / total if total else 0.0

    def close(self) -> None:
        """Remove the sites' residuals (idempotent)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> UpdateCodec:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
