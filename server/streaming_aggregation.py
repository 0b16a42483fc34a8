"""Aggregating site updates as they arrive, in memory that does not grow with the number of sites.

:func:`server.aggregation.aggregate_updates` takes every decoded update at once, so the server holds
(number of sites) x (model) floats at the end of a round: 20 sites of the paper's 466 MB MAE are 9.3 GB.
:class:`StreamingAggregator` takes one validated update at a time and lets it go:

* ``fedavg`` / ``fedprox``: a running weighted sum in float32 accumulators, ``sum_i w_i u_i``,
  and the weight total; :meth:`~StreamingAggregator.result` divides once. Memory: one model-sized
  accumulator (plus the update being added, which the caller drops after :meth:`add`; a
  :class:`~server.update_checks.ValidatedUpdate` is read one decoded tensor at a time).
  With ``max_share < 1`` (``max-site-share``: no site's share of the weights above the cap, see
  :func:`server.aggregation.capped_shares`) the shares are known only once every update is in, so each
  update is also spooled to disk (below); when the cap does not bind the running sum is the result, and
  when it binds the result is recomputed from the spool with the capped shares, a slice at a time, into
  the accumulator's memory. Memory stays one accumulator either way; disk: (number of sites) x (model).
* ``trimmed-mean`` / ``median``: an exact coordinate-wise statistic needs every site's value of every
  coordinate, so the updates are kept, but on disk: each update is appended flat (float32) to its own file
  in a private spool directory, and :meth:`result` reads all sites' values of a slice of coordinates at a
  time (``np.fromfile`` with an offset, not a memory map, so the pages do not count as the process's
  memory), sorts them in place and reduces. Memory: the result, plus :data:`CHUNK_BYTES` for the slice
  of all sites together. Disk: (number of sites) x (model) float32, deleted by :meth:`close`. The result is
  identical to the in-memory ``aggregate_updates`` (same sort, same reduction).

The robust statistics ignore weights on purpose (a site cannot buy influence by claiming more examples), as
in :mod:`server.aggregation`.

Usage in the runner (replies may be pulled one by one with ``grid.pull_messages``, or iterated from
``send_and_receive``; either way each decoded update is dropped after ``add``)::

    with StreamingAggregator(method, trim=trim, spool_dir=run_dir / "spool") as agg:
        for reply in replies:
            delta = validate_update(site, packed_arrays(reply), layout, max_norm)   # checks; decodes on read
            agg.add(delta, num_examples)
            del delta
        update = agg.result()     # name -> tensor, as aggregate_updates returns

Examples:
    >>> import torch
    >>> with StreamingAggregator("median") as agg:
    ...     for v in (1.0, 2.0, 100.0):
    ...         agg.add({"w": torch.tensor([v])}, 1)
    ...     agg.result()["w"]
    tensor([2.])
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import torch

from server.aggregation import METHODS, capped_shares
from server.update_checks import ValidatedUpdate

__all__ = ["StreamingAggregator", "CHUNK_BYTES", "SPOOL_PREFIX"]

log = logging.getLogger(__name__)

#: Bytes of all sites' values of one slice of coordinates when reducing spooled updates (the slice shrinks
#: as sites are added, so the robust methods' working memory does not grow with the consortium).
CHUNK_BYTES = 32 << 20
#: Name prefix of a spool directory (a server killed mid-round leaves one; the runner removes it on start).
SPOOL_PREFIX = "aggregation-spool-"


class StreamingAggregator:
    """Fold validated site updates into one as they arrive (see the module docstring for memory and disk).

    Args:
        method: one of :data:`server.aggregation.METHODS`.
        trim: fraction cut at each end by ``trimmed-mean`` (at least one value is always kept).
        spool_dir: where robust methods (and capped fedavg) keep the updates until :meth:`result`; a
            private temporary directory is made inside it (default: the system's temporary directory) and
            removed by :meth:`close`.
        max_share: fedavg/fedprox only: no site's share of the weights above this cap (1: no cap).
    """

    def __init__(self, method: str = "fedavg", trim: float = 0.2,
                 spool_dir: str | os.PathLike[str] | None = None, max_share: float = 1.0) -> None:
        if method not in METHODS:
            raise ValueError(f"aggregation method must be one of {', '.join(METHODS)}; got {method!r}")
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trimmed-mean trim must be in [0, 0.5); got {trim}")
        if not 0.0 < max_share <= 1.0:
            raise ValueError(f"max-site-share must be in (0, 1]; got {max_share}")
        self.method, self.trim = method, float(trim)
        self.robust = method not in ("fedavg", "fedprox")
        self.max_share = float(max_share)
        self._capped = not self.robust and self.max_share < 1.0
        self._weights: list[float] = []
        self._spool_parent = Path(spool_dir) if spool_dir is not None else None
        self._spool: Path | None = None
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self._first_int: dict[str, torch.Tensor] = {}
        self._total = 0.0
        self.count = 0

    # -- folding ----------------------------------------------------------------------------------------------
    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one site's decoded update in; the caller can drop ``update`` afterwards.

        Each entry is read once (a :class:`~server.update_checks.ValidatedUpdate` decodes it then), added
        and let go, so only one decoded tensor is alive at a time.

        Raises:
            ValueError: a layout (names, shapes, floating or not) that differs from the first update's, a
                negative or non-finite weight, or :meth:`result` was already taken.
        """
        if self._layout is not None and self.count < 0:
            raise ValueError("Unable to add an update as this aggregator's result was already taken")
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"Unable to add an update with weight {weight}: weights are example counts >= 0")
        layout = _layout_of(update)
        first = self._layout is None
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            diff = sorted(set(layout.items()) ^ set(self._layout.items()), key=str)[:3]
            raise ValueError(f"Unable to add an update whose layout differs from the first one's: {diff}")
        spool = self._spool_file() if self.robust or self._capped else None
        try:
            for name, (_, dtype) in layout.items():
                if dtype != torch.float32:
                    if first:
                        self._first_int[name] = update[name].detach().clone()
                    continue
                value = update[name].detach().float()
                if spool is not None:
                    spool.write(value.contiguous().numpy().tobytes())
                if self.robust:
                    continue
                if name in self._acc:
                    self._acc[name].add_(value, alpha=weight)  # no temporary
                else:
                    self._acc[name] = value.contiguous() * weight
        finally:
            if spool is not None:
                spool.close()
        self._total += weight
        self._weights.append(weight)
        self.count += 1

    def _spool_file(self) -> BinaryIO:
        if self._spool is None:
            parent = self._spool_parent or Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._spool = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=parent))
        return open(self._spool / f"{self.count:05d}.f32", "wb")  # noqa: SIM115 - closed by add

    # -- result -----------------------------------------------------------------------------------------------
    def result(self) -> dict[str, torch.Tensor]:
        """The aggregated update: name -> float32 tensor (integer buffers: the first site's).

        Raises:
            ValueError: nothing was added, or fedavg/fedprox weights sum to 0.
        """
        if self._layout is None or self.count <= 0:
            raise ValueError("Unable to aggregate as there are no updates")
        if not self.robust and not self._total > 0:
            raise ValueError("Unable to average as the sites' num-examples sum to 0")
        out: dict[str, torch.Tensor] = {}
        if self._capped:
            shares = capped_shares(self._weights, self.max_share)
            if any(abs(s - w / self._total) > 1e-9 for s, w in zip(shares, self._weights, strict=True)):
                self._recompute_from_spool(shares)  # the cap binds: sum_i share_i u_i, into the accumulators
                self._total = 1.0
        if self.robust:
            flat = self._reduce_spool()
            offset = 0
        for name, (shape, dtype) in self._layout.items():
            if dtype != torch.float32:
                out[name] = self._first_int[name]
            elif self.robust:
                n = math.prod(shape)
                out[name] = torch.from_numpy(flat[offset:offset + n].reshape(shape))
                offset += n
            else:
                out[name] = self._acc.pop(name).div_(self._total)
        self.count = -1
        self.close()
        return out

    def _reduce_spool(self) -> np.ndarray:
        assert self._spool is not None and self._layout is not None
        total = sum(math.prod(s) for s, d in self._layout.values() if d == torch.float32)
        files = sorted(self._spool.glob("*.f32"))
        k = len(files)
        out = np.empty(total, np.float32)
        cut = int(math.floor(self.trim * k))
        if k - 2 * cut < 1:
            cut = (k - 1) // 2
        chunk = max(1, CHUNK_BYTES // (4 * k))
        rows = np.empty((k, min(chunk, total)), np.float32)
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            for i, f in enumerate(files):
                rows[i, :n] = np.fromfile(f, np.float32, count=n, offset=4 * start)
            ordered = rows[:, :n]
            ordered.sort(axis=0)  # in place: no index tensor, no copy
            if self.method == "median":
                value = (ordered[(k - 1) // 2] + ordered[k // 2]) / 2
            else:
                value = ordered[cut:k - cut].mean(axis=0, dtype=np.float32)
            out[start:start + n] = value
        return out

    def _recompute_from_spool(self, shares: list[float]) -> None:
        """Overwrite the running sum with ``sum_i shares[i] u_i`` read back from the spool a slice at a time."""
        assert self._spool is not None and self._layout is not None
        files = sorted(self._spool.glob("*.f32"))
        offset = 0
        for name, (shape, dtype) in self._layout.items():
            if dtype != torch.float32:
                continue
            n = math.prod(shape)
            flat = self._acc[name].view(-1)
            for start in range(0, n, max(1, CHUNK_BYTES // 4)):
                m = min(CHUNK_BYTES // 4, n - start)
                part = flat[start:start + m]
                part.zero_()
                for f, share in zip(files, shares, strict=True):
                    values = np.fromfile(f, np.float32, count=m, offset=4 * (offset + start))
                    part.add_(torch.from_numpy(values), alpha=share)
            offset += n

    # -- cleanup ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Delete the spooled updates (idempotent); accumulators are released with the object."""
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def __enter__(self) -> StreamingAggregator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _layout_of(update: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, float32 or the integer dtype), without decoding a :class:`ValidatedUpdate` again."""
    if isinstance(update, ValidatedUpdate):
        items = [(k, shape, dtype) for k, (shape, dtype) in update.layout.items()]
    else:
        items = [(k, tuple(v.shape), v.dtype) for k, v in update.items()]
    return {k: (tuple(shape), torch.float32 if dtype.is_floating_point else dtype) for k, shape, dtype in items}
