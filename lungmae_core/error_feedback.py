"""Error feedback for compressed updates: what a round's encoding dropped is added to the next round's update.

Lossy encodings (``int8``, ``topk`` in :mod:`lungmae_core.wire`) lose part of every update. Without
correction the loss is a bias that accumulates (top-k drops the same small coordinates round after round);
with error feedback (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019) the
site keeps the residual ``e = (update + e_prev) - decode(encode(update + e_prev))`` and adds it to the next
update, so every coordinate arrives eventually and the sum of what was sent tracks the sum of the updates.

The residual must survive between rounds, and a ClientApp process may be started afresh for every message,
so it lives in a file under the site's state directory, written atomically (a crash leaves either the old or
the new residual, never half of one). It is derived from the update that was already computed (and, under
DP, already privatised), so keeping it costs no privacy: it is post-processing of the released update.

A residual only applies to the same tensors: a change of phase (MAE pretraining to fine-tuning sends other
names), of model or of run tag discards it (logged), as does ``fp32``, which drops nothing.

Examples:
    >>> import tempfile, torch
    >>> ef = ErrorFeedback(tempfile.mkdtemp(), tag="run-1/pretrain")
    >>> packed = ef.pack({"w": torch.full((3000,), 1e-4)}, "topk")
    >>> float(ef.residual_norm()) > 0  # the 90% that top-k did not send waits for the next round
    True
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lungmae_core.atomic import atomic_write_bytes
from lungmae_core.wire import pack_state, unpack_state

__all__ = ["ErrorFeedback", "RESIDUAL_FILE"]

log = logging.getLogger(__name__)

#: File name of the residual inside the state directory.
RESIDUAL_FILE = "update-residual.pt"
_FORMAT = 1


class ErrorFeedback:
    """Carry each round's compression error into the next round's update, persisted in ``state_dir``.

    Args:
        state_dir: the site's private state directory (created if missing, mode 0700).
        tag: what the residual belongs to, e.g. ``f"{run_id}/{phase}"``; a stored residual with another
            tag is discarded, so a new run or phase does not inherit an old error.
    """

    def __init__(self, state_dir: str | os.PathLike[str], tag: str = "") -> None:
        self.path = Path(state_dir) / RESIDUAL_FILE
        self.tag = str(tag)

    def load(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored residual if it fits ``like`` (same tag, floating names and shapes), else an empty mapping.

        Returns:
            name -> float32 tensor for each floating entry of ``like`` that has a residual (may be empty).
        """
        if not self.path.exists():
            return {}
        try:
            record = torch.load(io.BytesIO(self.path.read_bytes()), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged residual is dropped, never fatal
            log.warning("discarding the update residual %s as it cannot be read: %s", self.path, exc)
            return {}
        residual = record.get("residual", {}) if isinstance(record, dict) else {}
        wanted = {k: tuple(v.shape) for k, v in like.items() if v.is_floating_point()}
        have = {k: tuple(v.shape) for k, v in residual.items()}
        if record.get("format") != _FORMAT or record.get("tag") != self.tag or have != wanted:
            log.info("discarding the update residual %s (tag %r, now %r; %d vs %d tensors)", self.path,
                     record.get("tag"), self.tag, len(have), len(wanted))
            return {}
        return {k: v.float() for k, v in residual.items()}

    def pack(self, update: Mapping[str, torch.Tensor], compression: str) -> dict[str, np.ndarray]:
        """Encode ``update + residual`` with ``compression`` and store the new residual; return the arrays.

        Args:
            update: this round's ``local - global`` (``lungmae_core.wire.state_delta``).
            compression: a :data:`lungmae_core.wire.COMPRESSIONS` name.

        Returns:
            what :func:`lungmae_core.wire.pack_state` returns, ready for the reply.
        """
        residual = self.load(update)
        compensated = {k: (v.float() + residual[k]) if k in residual else v for k, v in update.items()}
        packed = pack_state(compensated, compression)
        if compression == "fp32":
            self.clear()
            return packed
        sent = unpack_state(packed)
        new = {k: (v.float() - sent[k]).contiguous() for k, v in compensated.items() if v.is_floating_point()}
        if not all(bool(torch.isfinite(v).all()) for v in new.values()):
            # The update itself is non-finite: the server rejects it; do not poison later rounds with it.
            log.warning("not keeping a non-finite update residual")
            self.clear()
            return packed
        self._save(new)
        return packed

    def residual_norm(self) -> float:
        """L2 norm of the stored residual (0 when there is none): how much is still owed to the server."""
        if not self.path.exists():
            return 0.0
        record = torch.load(io.BytesIO(self.path.read_bytes()), weights_only=True)
        return math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in record["residual"].values()))

    def clear(self) -> None:
        """Forget the residual (e.g. after the site's update was rejected and the round starts over)."""
        self.path.unlink(missing_ok=True)

    def _save(self, residual: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        buf = io.BytesIO()
        torch.save({"format": _FORMAT, "tag": self.tag, "residual": residual}, buf)
        atomic_write_bytes(self.path, buf.getvalue(), mode=0o600)
