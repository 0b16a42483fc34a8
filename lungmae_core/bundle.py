"""One bundle per message: a packed model as a small layout plus its bytes in a few large parts.

The packed arrays of :func:`lungmae_core.wire.pack_state` travel as one *bundle*: a uint8
``payload`` holding every array's bytes back to back (each at an 8-byte aligned offset; past
:data:`PART_BYTES` it continues in ``payload-1``, ...) and a small uint8 ``layout`` (UTF-8 JSON
``[[name, shape, dtype], ...]``). Flower 1.42 moves each array of a message as its own
object, one HTTP request each, so a model of 49 tensors cost ~100 requests per message and ~7 s per round on
loopback (docs/performance.md, "Deployment round overhead"); a bundle costs one array per 64 MiB. The
receiver recomputes the parts and offsets from the layout, and a part whose length differs from what the
layout adds up to is rejected before any array is read.

Updates in ``int8`` also travel *deflated* (:data:`DEFLATED`): each payload part is Huffman-coded with
zlib (``Z_HUFFMAN_ONLY``, no string matching). Per-block int8 values of an update are far from uniform
over the 256 codes, so this takes 2-10% off the int8 bytes losslessly (25.1% -> 24.6% of fp32 for the
experiment's updates, 22.8% for a paper-size MAE update; docs/performance.md), at ~100 MB/s on one core.
Which parts are deflated follows from the round's compression, which both sides know, never from the
sender; the receiver inflates each part to exactly the length the layout calls for (``max_length``), so a
"zip bomb" costs it no more than an honest part.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from lungmae_core.wire import WireFormatError

__all__ = ["BUNDLE_KEYS", "PART_BYTES", "MAX_LAYOUT_BYTES", "DEFLATED", "OBJECT_RETRY", "bundle", "unbundle",
           "layout_nbytes", "payload_nbytes", "part_spans", "part_name"]

#: The first two arrays of a bundle: the layout (UTF-8 JSON) and the payload (the arrays' bytes); a model over
#: :data:`PART_BYTES` continues in ``payload-1``, ``payload-2``, ...
BUNDLE_KEYS: tuple[str, str] = ("layout", "payload")
#: Bytes per payload part (the wire contract: both sides derive the parts from the layout with this).
PART_BYTES = 64 << 20
#: Upper bound on a bundle's layout: ~100 bytes per tensor, so room for ~40,000 tensors.
MAX_LAYOUT_BYTES = 4 << 20
#: The dtypes a bundle may declare (what :func:`pack_state` produces, plus the integer buffers of a model).
_BUNDLE_DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"})
_ALIGN = 8
#: How soon either side asks again for an object of a message that is still being uploaded (a message is
#: listed before its objects): keyword arguments for Flower 1.42's ``pull_objects``, which the ServerApp's grid
#: (``server.replies.quick_object_retries``) and each site's SuperNode (``client.supernode``) are bound to.
#: Flower waits 1 s, 2 s, ... up to 10 s, 500 tries per object, ~1 s lost in many rounds; from 0.05 s doubling
#: to 1 s with ten times the tries the patience stays the same (~80 min).
#: Read-only: both sides of a simulation share this process.
OBJECT_RETRY: Mapping[str, float] = MappingProxyType(
    {"initial_backoff": 0.05, "backoff_cap": 1.0, "max_tries_per_object": 5000})
#: The compressions whose updates travel deflated. Not fp16/fp32 (float bytes barely compress) nor top-k
#: (fp16 values and int32 positions; not measured to pay).
DEFLATED = frozenset({"int8"})


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def part_name(index: int) -> str:
    """The name of payload part ``index`` in a bundle: ``payload``, ``payload-1``, ..."""
    return "payload" if index == 0 else f"payload-{index}"


def part_spans(sizes: Iterable[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """(part, offset) of each array of ``sizes`` bytes, and each part's length, by the one packing rule.

    Arrays go in order; each starts at an 8-byte aligned offset of the current part, and a new part starts
    when the next array would take a non-empty part past :data:`PART_BYTES` (a larger array gets a part of
    its own). Sender and receiver both apply it, so the part lengths are never taken from the sender.
    """
    spans: list[tuple[int, int]] = []
    parts = [0]
    for nbytes in sizes:
        if parts[-1] and parts[-1] + nbytes > PART_BYTES:
            parts.append(0)
        spans.append((len(parts) - 1, parts[-1]))
        parts[-1] = _aligned(parts[-1] + nbytes)
    return spans, parts


def bundle(packed: Mapping[str, np.ndarray], *, deflate: bool = False) -> dict[str, np.ndarray]:
    """:func:`pack_state` output -> ``{"layout": uint8 JSON, "payload": uint8, "payload-1": ...}``.

    Each array's bytes (C order) start at an 8-byte aligned offset of a payload part; the gaps are zeros.
    A model up to :data:`PART_BYTES` travels in one part (``payload``); a larger one in parts of about that
    size, so that neither side ever serialises or joins more than one part at a time on top of the model
    (one 222 MB array measured +0.5x the fp32 model at the server's peak). The layout lists
    ``[name, shape, dtype]`` in the packed order, so :func:`unbundle` returns the same mapping. With
    ``deflate`` each part is sent Huffman-coded (the receiver must be told the same, see :data:`DEFLATED`).

    Raises:
        WireFormatError: an array of a dtype a bundle may not carry (object, complex, strings).
    """
    entries: list[list[Any]] = []
    arrays: list[np.ndarray] = []
    for name, value in packed.items():
        arr = np.asarray(value, order="C")  # (ascontiguousarray would turn a 0-d array 1-d)
        if str(arr.dtype) not in _BUNDLE_DTYPES:
            raise WireFormatError(f"Unable to bundle {name!r} of dtype {arr.dtype}; a bundle carries "
                                  f"{', '.join(sorted(_BUNDLE_DTYPES))}")
        entries.append([str(name), [int(s) for s in arr.shape], str(arr.dtype)])
        arrays.append(arr)
    spans, parts = part_spans(arr.nbytes for arr in arrays)
    layout = np.frombuffer(json.dumps(entries, separators=(",", ":")).encode("utf-8"), np.uint8).copy()
    out = {BUNDLE_KEYS[0]: layout}
    for index, length in enumerate(parts):
        part = np.zeros(length, np.uint8)
        for arr, (where, start) in zip(arrays, spans, strict=True):
            if where == index:
                part[start:start + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        out[part_name(index)] = _deflate(part) if deflate else part
    return out


def _deflate(part: np.ndarray) -> np.ndarray:
    coder = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return np.frombuffer(coder.compress(part.data) + coder.flush(), np.uint8)


def _inflate(name: str, part: np.ndarray, length: int) -> np.ndarray:
    """A deflated part -> exactly ``length`` bytes, or ``WireFormatError``; never more than ``length`` made."""
    if length > 8 * part.size:
        raise WireFormatError(f"Unable to unbundle as {name!r} has {part.size} deflated bytes for {length}; a "
                              "Huffman-coded part is at least 1/8 of its length")
    coder = zlib.decompressobj()
    try:
        out = coder.decompress(np.ascontiguousarray(part).data, length)
        if not coder.eof and len(out) == length:  # the end-of-stream marker may still be unread
            extra = coder.decompress(coder.unconsumed_tail, 1)
            if extra:
                raise WireFormatError(f"Unable to unbundle as {name!r} inflates past the {length} bytes the layout "
                                      "adds up to")
    except zlib.error as exc:
        raise WireFormatError(f"Unable to unbundle as {name!r} is not a deflate stream: {exc}") from None
    if len(out) != length:
        raise WireFormatError(f"Unable to unbundle as {name!r} inflates to {len(out)} bytes, not the {length} the "
                              "layout adds up to")
    if not coder.eof or coder.unused_data:
        raise WireFormatError(f"Unable to unbundle as {name!r} "
                              f"{'has data after its end' if coder.eof else 'is cut short before its end'}")
    return np.frombuffer(out, np.uint8)


def layout_nbytes(layout: Mapping[str, tuple[Sequence[int], str]]) -> int:
    """Bytes the payload parts of a bundle of ``layout`` (name -> (shape, dtype)) add up to, before deflating."""
    return sum(part_spans(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in layout.values())[1])


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of a bundle's payload parts as they travel (deflated where they are; the layout not counted)."""
    return int(sum(np.asarray(v).nbytes for k, v in arrays.items() if k != BUNDLE_KEYS[0]))


def _read_layout(raw: np.ndarray) -> list[tuple[str, tuple[int, ...], np.dtype[Any]]]:
    """Parse and bound-check a received layout: a JSON list of ``[name, shape, dtype]`` with unique names."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise WireFormatError(f"Unable to unbundle as the layout is {raw.dtype} of shape {raw.shape}, "
                              "not 1-D uint8")
    if raw.size > MAX_LAYOUT_BYTES:
        raise WireFormatError(f"Unable to unbundle as the layout has {raw.size} bytes, over {MAX_LAYOUT_BYTES}")
    try:
        entries = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireFormatError(f"Unable to unbundle as the layout is not UTF-8 JSON: {exc}") from None
    if not isinstance(entries, list):
        raise WireFormatError("Unable to unbundle as the layout is not a JSON list of [name, shape, dtype]")
    out: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], list) and isinstance(entry[2], str)
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40 for d in entry[1])
              and len(entry[1]) <= 8)
        if not ok:
            raise WireFormatError(f"Unable to unbundle as layout entry {i} is not [name, shape of <= 8 "
                                  "non-negative ints, dtype]")
        name, shape, dtype = entry
        if name in seen or not name or len(name) > 512:
            raise WireFormatError(f"Unable to unbundle as layout entry {i} has an empty, over-long or repeated "
                                  f"name {name[:64]!r}")
        if dtype not in _BUNDLE_DTYPES:
            raise WireFormatError(f"Unable to unbundle {name!r} as its dtype {dtype[:32]!r} is not one of "
                                  f"{', '.join(sorted(_BUNDLE_DTYPES))}")
        seen.add(name)
        out.append((name, tuple(shape), np.dtype(dtype)))
    return out


def unbundle(arrays: Mapping[str, np.ndarray], *, deflate: bool = False,
             max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """A received bundle -> the packed arrays (read-only views into the payload parts, no copy unless deflated).

    Checks only that the bundle is well formed: a bounded layout of unique names and allowed dtypes first,
    then exactly the arrays the layout calls for (``layout``, ``payload``, ``payload-1``, ...), each part
    exactly as long as the packing rule makes it (so no declared shape can reach past the bytes that
    arrived). Whether the names, shapes and dtypes are the ones the receiver expects is the caller's check
    (``server.update_checks``, the site's layout check), but ``max_bytes`` (what the receiver expects)
    bounds the layout's total before any part is read, so that a layout the sender made up cannot make it
    inflate more than an honest update. With ``deflate`` (the receiver's own knowledge of the round's
    compression, :data:`DEFLATED`) each part is inflated to exactly the length the rule gives, and only if
    that is at most 8x its deflated size (Huffman coding spends at least one bit per byte, so an honest part
    never inflates more).

    Raises:
        WireFormatError: naming what is malformed.
    """
    keys = list(arrays)
    if not keys or keys[0] != BUNDLE_KEYS[0] or BUNDLE_KEYS[1] not in arrays:
        got = ", ".join(repr(k) for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise WireFormatError(f"Unable to unbundle as a bundle holds exactly the arrays 'layout' and 'payload' "
                              f"(then 'payload-1', ... past {PART_BYTES >> 20} MiB); got {got or 'none'}")
    entries = _read_layout(np.asarray(arrays[BUNDLE_KEYS[0]]))
    sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in entries]
    spans, parts = part_spans(sizes)
    if max_bytes is not None and sum(parts) > max_bytes:
        raise WireFormatError(f"Unable to unbundle as the layout adds up to {sum(parts)} bytes, over the "
                              f"{max_bytes} expected")
    expected = [BUNDLE_KEYS[0], *(part_name(i) for i in range(len(parts)))]
    if keys != expected:
        raise WireFormatError(f"Unable to unbundle as the layout calls for the arrays {expected[:4]}"
                              f"{' ...' if len(expected) > 4 else ''}; got {keys[:4]}{' ...' if len(keys) > 4 else ''}")
    received = []
    for index, length in enumerate(parts):
        part = np.asarray(arrays[part_name(index)])
        if part.dtype != np.uint8 or part.ndim != 1:
            raise WireFormatError(f"Unable to unbundle as {part_name(index)!r} is {part.dtype} of shape "
                                  f"{part.shape}, not 1-D uint8")
        if deflate:
            part = _inflate(part_name(index), part, length)
        elif part.size != length:
            what = "the payload" if len(parts) == 1 else repr(part_name(index))
            raise WireFormatError(f"Unable to unbundle as the layout adds up to {length} bytes but {what} has "
                                  f"{part.size}")
        received.append(part)
    out: dict[str, np.ndarray] = {}
    for (name, shape, dtype), nbytes, (index, start) in zip(entries, sizes, spans, strict=True):
        view = received[index][start:start + nbytes].view(dtype).reshape(shape)
        view.flags.writeable = False
        out[name] = view
    return out
