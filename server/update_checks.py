"""Validation of every site update before it is aggregated.

An update that does not match the global model (names, shapes, dtypes), holds NaN/inf, or moves the model
further than the configured norm bound is dropped, whatever its cause: a bug at a site, a diverged local
run, a wrong model config, or a malicious participant. The reason names the site and the check only; no
value from the update and nothing about the site's data is logged.

Examples:
    >>> import numpy as np, torch
    >>> from lungmae_core.wire import pack_state, packed_layout
    >>> layout = packed_layout({"w": torch.zeros(4, 4)}, "fp16")
    >>> validate_update("site-a", pack_state({"w": torch.full((4, 4), 0.1)}, "fp16"), layout, max_norm=10.0)["w"].shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from lungmae_core.errors import LungMAEError
from lungmae_core.wire import WireFormatError, packed_names, squared_norm, unpack_entry

__all__ = ["CHECKS", "UpdateRejected", "Rejection", "ValidatedUpdate", "validate_update"]

# Checks in the order they run (server.strategy runs the first six on the reply, these the last five on
# the update); each rejection names one of them.
CHECKS: tuple[str, ...] = ("replay", "identity", "size", "contract", "count", "privacy", "names", "shapes", "dtypes",
                           "finite", "norm")


class UpdateRejected(LungMAEError):
    """An update failed a check; ``check`` is one of :data:`CHECKS`, the message says which site and why."""

    def __init__(self, site: str, check: str, detail: str) -> None:
        assert check in CHECKS, check
        super().__init__(f"update from site {site!r} rejected by the {check} check: {detail}")
        self.site = site
        self.check = check
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A dropped update as recorded in ``metrics.jsonl`` (site, check, reason; never values)."""

    site: str
    check: str
    reason: str

    @classmethod
    def from_error(cls, err: UpdateRejected) -> Rejection:
        return cls(site=err.site, check=err.check, reason=err.detail)


def _short(names: list[str], limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


class ValidatedUpdate(Mapping[str, torch.Tensor]):
    """A checked update that decodes each tensor when it is read, from the arrays as they arrived.

    Why: a decoded paper-size update is a model's worth of float32 (445 MiB) next to the received fp16 or
    int8 arrays; decoding one tensor at a time while it is folded into the running sum keeps only the
    received arrays and one decoded tensor alive (``benchmarks/server_memory.py``). The price is decoding
    twice (once to check, once to fold), which is a cast per value for fp16 and a multiply for int8.

    Reading an entry returns a fresh float32 tensor (integer buffers keep their dtype) times :attr:`scale`
    (floating entries only). ``layout`` (name -> (shape, dtype) as decoded) and ``norm`` (the global L2 norm
    before scaling) were measured by :func:`validate_update`.
    """

    def __init__(self, packed: Mapping[str, np.ndarray], layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 norm: float, shapes: Mapping[str, tuple[int, ...]] | None) -> None:
        self._packed, self._shapes = packed, shapes
        self.layout = layout  # its keys are the entries, in the order they arrived
        self.norm = norm
        self.scale = 1.0

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.layout:
            raise KeyError(name)
        value = unpack_entry(self._packed, name, self._shapes)
        if self.scale != 1.0 and value.is_floating_point():
            value.mul_(self.scale)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)

    def scale_by(self, factor: float) -> None:
        """Multiply every floating entry by ``factor`` when it is read (central DP's per-update clipping)."""
        self.scale *= float(factor)


def validate_update(
    site: str,
    packed: Mapping[str, np.ndarray],
    layout: Mapping[str, tuple[tuple[int, ...], str]],
    max_norm: float,
    shapes: Mapping[str, tuple[int, ...]] | None = None,  # [perf] needed for topk updates
) -> ValidatedUpdate:
    """Check a packed update against the expected layout and bounds; return it, decoded as it is read.

    Args:
        site: the site's display name, used in the rejection message.
        packed: arrays as received (``lungmae_core.wire.pack_state`` of local - global).
        layout: expected ``name -> (shape, dtype)`` (``lungmae_core.wire.packed_layout`` of the global
            model's sent part under the configured compression).
        max_norm: upper bound on the update's global L2 norm.
        shapes: the global model's shape per name; a ``topk`` update declares its tensors' shapes itself,
            and only this check stops a smaller declared shape from broadcasting in the aggregate.

    Returns:
        the update as a :class:`ValidatedUpdate`: name -> float32 tensor (integer buffers keep their
        dtype), decoded when read, ready to aggregate.

    Raises:
        UpdateRejected: at the first failed check, in the order of :data:`CHECKS`.
    """
    missing = [n for n in layout if n not in packed]
    unexpected = [n for n in packed if n not in layout]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_short(unexpected)})")
        raise UpdateRejected(site, "names", "; ".join(parts))
    bad_shape = [f"{n} {tuple(np.shape(packed[n]))} != {shape}" for n, (shape, _) in layout.items()
                 if tuple(np.shape(packed[n])) != tuple(shape)]
    if bad_shape:
        raise UpdateRejected(site, "shapes", "; ".join(bad_shape[:3]))
    bad_dtype = [f"{n} {np.asarray(packed[n]).dtype} != {dtype}" for n, (_, dtype) in layout.items()
                 if str(np.asarray(packed[n]).dtype) != dtype]
    if bad_dtype:
        raise UpdateRejected(site, "dtypes", "; ".join(bad_dtype[:3]))
    # every entry is decoded once here, checked and let go; ValidatedUpdate decodes again when it is folded
    try:
        names = packed_names(packed)
    except WireFormatError as exc:
        raise UpdateRejected(site, "dtypes", str(exc)) from None
    decoded_layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    non_finite: list[str] = []
    sq = 0.0
    for name in names:
        try:
            value = unpack_entry(packed, name, shapes)  # [perf] shapes
        except WireFormatError as exc:
            raise UpdateRejected(site, "dtypes", str(exc)) from None
        decoded_layout[name] = (tuple(value.shape), value.dtype)
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                non_finite.append(name)
            elif not non_finite:
                sq += squared_norm(value)
    if non_finite:
        raise UpdateRejected(site, "finite", f"non-finite values in {_short(non_finite)}")
    norm = math.sqrt(sq)
    if not norm <= max_norm:
        raise UpdateRejected(site, "norm", f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return ValidatedUpdate(packed, decoded_layout, norm, shapes)
