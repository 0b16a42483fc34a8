"""Bounded readers of the wire contract's fields: each raises :class:`ContractError` naming the key.

Split from ``lungmae_core.contract`` so the message definitions read on their own; nothing here knows a
message, only how one value is checked (presence, type, finiteness, range, choice, list of counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lungmae_core.errors import LungMAEError

__all__ = ["ContractError", "CONTRACT_VERSION", "MAX_EXAMPLES", "get_field", "read_int", "read_float", "read_bool",
           "read_choice", "read_counts", "exact_keys", "check_version", "show"]

#: Bumped on every incompatible change of a message; both sides refuse any other version.
CONTRACT_VERSION = 5
#: Hard upper bound of any count on the wire; the server further bounds it by the site's declared count.
MAX_EXAMPLES = 10_000_000


class ContractError(LungMAEError, ValueError):
    """A message breaks the contract. ``field`` names the offending key ('' for the message as a whole)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def get_field(m: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in m:
        raise ContractError(f"{what}: missing {key!r}", key)
    return m[key]


def read_int(m: Mapping[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    v = get_field(m, key, what)
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        else:
            raise ContractError(f"{what}: {key!r} must be an integer; got {type(v).__name__} {show(v)}", key)
    if not lo <= v <= hi:
        raise ContractError(f"{what}: {key!r} must be in [{lo}, {hi}]; got {v}", key)
    return int(v)


def read_float(m: Mapping[str, Any], key: str, what: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    v = get_field(m, key, what)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ContractError(f"{what}: {key!r} must be a number; got {type(v).__name__} {show(v)}", key)
    v = float(v)
    if not math.isfinite(v):
        raise ContractError(f"{what}: {key!r} must be finite; got {v}", key)
    if v < lo or v > hi or (open_lo and v <= lo):
        raise ContractError(f"{what}: {key!r} must be in {'(' if open_lo else '['}{lo:g}, {hi:g}]; got {v:g}", key)
    return v


def read_bool(m: Mapping[str, Any], key: str, what: str) -> bool:
    v = get_field(m, key, what)
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
        return bool(v)
    raise ContractError(f"{what}: {key!r} must be a bool (or 0/1); got {show(v)}", key)


def read_choice(m: Mapping[str, Any], key: str, what: str, choices: Sequence[str]) -> str:
    v = get_field(m, key, what)
    if not isinstance(v, str) or v not in choices:
        raise ContractError(f"{what}: {key!r} must be one of {', '.join(choices)}; got {show(v)}", key)
    return v


def read_counts(m: Mapping[str, Any], key: str, what: str, lengths: Sequence[int]) -> tuple[int, ...]:
    v = get_field(m, key, what)
    if not isinstance(v, (list, tuple)):
        raise ContractError(f"{what}: {key!r} must be a list of integers; got {type(v).__name__}", key)
    if len(v) not in lengths:
        raise ContractError(f"{what}: {key!r} has {len(v)} entries; expected {' or '.join(map(str, lengths))}", key)
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_EXAMPLES:
            raise ContractError(f"{what}: {key!r} must hold integers in [0, {MAX_EXAMPLES}]; got {show(x)}", key)
        out.append(int(x))
    return tuple(out)


def show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def exact_keys(m: Mapping[str, Any], expected: Sequence[str], what: str) -> None:
    if not isinstance(m, Mapping):
        raise ContractError(f"{what}: expected a mapping; got {type(m).__name__}")
    unexpected = sorted(set(m) - set(expected))
    if unexpected:
        raise ContractError(f"{what}: unexpected keys {unexpected[:5]}", unexpected[0])
    missing = [k for k in expected if k not in m]
    if missing:
        raise ContractError(f"{what}: missing keys {missing[:5]}", missing[0])


def check_version(m: Mapping[str, Any], key: str, what: str) -> None:
    if not isinstance(m, Mapping):
        raise ContractError(f"{what}: expected a mapping; got {type(m).__name__}")
    v = m.get(key)
    if v != CONTRACT_VERSION or isinstance(v, bool):
        raise ContractError(f"{what}: contract version {show(v)} but this side speaks version {CONTRACT_VERSION}; "
                            "coordinator and sites must run the same LungMAE-FL contract", key)
