"""Packing model state dicts for the wire: fp32, fp16 (default), 8-bit or top-k sparse, with exact byte counts.

Model weights are the only thing that leaves a site, and on a hospital uplink they are the bulk of the
traffic (the paper's MAE is ~465 MB in fp32). This module turns a state dict into a flat mapping of NumPy
arrays in one of three encodings and back, framework-free so that both the ClientApp and the ServerApp
(and a notebook) can use it; the Flower side only wraps the result in an ``ArrayRecord``.

Encodings (``compression``) and their payload as a share of fp32:
    * ``fp32``: floating tensors as float32; exact.
    * ``fp16``: floating tensors as float16; half the bytes, relative error ~5e-4. Values beyond
      +/-65504 become inf, which the server's update checks then reject as non-finite.
    * ``int8``: symmetric per-block quantisation; each floating tensor ``name`` becomes an int8 array
      ``name`` plus float32 scales ``name#int8-scale``, one per block of :data:`INT8_BLOCK` consecutive
      values of the flattened tensor (shape ``(ceil(numel / INT8_BLOCK),)``); 25.1% of the fp32 bytes.
      Per block rather than per tensor because one outlier (a position embedding row, a LayerNorm gain)
      would otherwise flatten every other value of its tensor to zero. Meant for *updates* (local - global).
    * ``topk``: the :data:`TOPK_FRACTION` largest-magnitude values of each floating tensor as float16
      (``name``, shape ``(k,)``), their flat positions ``name#topk-index`` (int32, ``(k,)``) and the
      tensor's shape ``name#topk-shape`` (int64, ``(ndim,)``); 15% of the fp32 bytes. Only sensible with
      error feedback at the site (:mod:`lungmae_core.error_feedback`), which carries what was dropped into
      the next round.

Non-floating tensors (integer buffers) travel unchanged in every encoding.

On the wire the packed arrays travel as one bundle (:mod:`lungmae_core.bundle`).

Examples:
    >>> import torch
    >>> state = {"w": torch.ones(768, 768), "b": torch.zeros(768)}
    >>> packed = pack_state(state, "fp16")
    >>> packed_nbytes(packed), state_nbytes(state)
    (1181184, 2362368)
    >>> unpack_state(packed)["w"].dtype
    torch.float32
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch

from lungmae_core.errors import LungMAEError

__all__ = [
    "COMPRESSIONS",
    "Compression",
    "SCALE_SUFFIX",
    "INDEX_SUFFIX",
    "SHAPE_SUFFIX",
    "INT8_BLOCK",
    "TOPK_FRACTION",
    "WireFormatError",
    "pack_state",
    "unpack_state",
    "packed_layout",
    "down_compression",
    "packed_nbytes",
    "state_nbytes",
    "state_delta",
    "apply_delta",
    "select",
    "update_norm",
    "squared_norm",
    "packed_names",
    "unpack_entry",
]

Compression = Literal["fp32", "fp16", "int8", "topk"]
COMPRESSIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "topk")
SCALE_SUFFIX = "#int8-scale"
INDEX_SUFFIX = "#topk-index"
SHAPE_SUFFIX = "#topk-shape"
_RESERVED = (SCALE_SUFFIX, INDEX_SUFFIX, SHAPE_SUFFIX)
#: Values per int8 scale: 4 bytes of scale per 1024 bytes of values (0.4% overhead).
INT8_BLOCK = 1024
#: Share of each floating tensor's values that ``topk`` sends (at least one value per tensor).
TOPK_FRACTION = 0.1
_INT8_MAX = 127.0


class WireFormatError(LungMAEError, ValueError):
    """A packed state does not follow the encoding it claims (missing scale, unknown compression)."""


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise WireFormatError(
            f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}")


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # NumPy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _num_blocks(numel: int) -> int:
    return max(1, math.ceil(numel / INT8_BLOCK))


def _quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block quantisation: ``x ~ q * scale[block]`` with ``q`` in [-127, 127].

    A block holding a non-finite value gets an infinite scale (and zeros), so the receiver's finiteness
    check sees it instead of a silently clipped value.
    """
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n, blocks = x32.size, _num_blocks(x32.size)
    padded = np.zeros(blocks * INT8_BLOCK, np.float32)
    padded[:n] = x32
    rows = padded.reshape(blocks, INT8_BLOCK)
    with np.errstate(invalid="ignore"):
        peak = np.max(np.abs(rows), axis=1)
    finite = np.isfinite(peak)
    scale = np.where(finite & (peak > 0), peak / _INT8_MAX, 1.0).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(rows / scale[:, None]), -_INT8_MAX, _INT8_MAX)
    q[~finite] = 0
    scale[~finite] = np.inf
    return q.astype(np.int8).reshape(-1)[:n].reshape(x.shape), scale


def _dequantize_int8(name: str, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    n = q.size
    if scale.size == 1:  # per-tensor scale (the encoding before per-block scales)
        with np.errstate(invalid="ignore", over="ignore"):
            whole: np.ndarray = q.astype(np.float32) * scale[0]
        return whole
    if scale.size != _num_blocks(n):
        raise WireFormatError(f"Unable to unpack {name!r} as its scale has {scale.size} values, not 1 or "
                              f"{_num_blocks(n)} (one per {INT8_BLOCK} values)")
    per_value = np.repeat(scale, INT8_BLOCK)[:n]
    with np.errstate(invalid="ignore", over="ignore"):
        blocked: np.ndarray = (q.reshape(-1).astype(np.float32) * per_value).reshape(q.shape)
    return blocked


def _topk_count(numel: int) -> int:
    return min(numel, max(1, math.ceil(TOPK_FRACTION * numel))) if numel else 0


def _sparsify_topk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The largest-magnitude values (float16) of ``x``, their flat positions (int32) and ``x``'s shape."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if flat.size >= 2 ** 31:
        raise WireFormatError(f"Unable to sparsify a tensor of {flat.size} values with int32 positions")
    k = _topk_count(flat.size)
    mag = np.abs(flat)
    mag[np.isnan(mag)] = np.inf  # a NaN must travel, so that the receiver rejects the update
    index = np.argpartition(mag, flat.size - k)[flat.size - k:] if k < flat.size else np.arange(flat.size)
    index = np.sort(index).astype(np.int32)
    with np.errstate(over="ignore"):
        values = flat[index].astype(np.float16)
    return values, index, np.array(x.shape, dtype=np.int64)


def _densify_topk(name: str, values: np.ndarray, index: np.ndarray, shape: np.ndarray) -> np.ndarray:
    shape_t = tuple(int(s) for s in np.asarray(shape).reshape(-1))
    if any(s < 0 for s in shape_t):
        raise WireFormatError(f"Unable to unpack {name!r} as its top-k shape {shape_t} is negative")
    numel = math.prod(shape_t)
    values, index = np.asarray(values).reshape(-1), np.asarray(index).reshape(-1)
    if values.size != index.size or not np.issubdtype(index.dtype, np.integer):
        raise WireFormatError(f"Unable to unpack {name!r} as it has {values.size} top-k values but "
                              f"{index.size} positions of dtype {index.dtype}")
    if index.size and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise WireFormatError(f"Unable to unpack {name!r} as a top-k position lies outside its {numel} values")
    dense = np.zeros(numel, np.float32)
    dense[index.astype(np.int64)] = values.astype(np.float32)
    return dense.reshape(shape_t)


def pack_state(
    state: Mapping[str, torch.Tensor | np.ndarray], compression: Compression | str = "fp16"
) -> dict[str, np.ndarray]:
    """Encode a state dict into contiguous NumPy arrays for an ``ArrayRecord``.

    Args:
        state: tensor or array per parameter name, any shapes (e.g. ``encoder.pos_embed.pos``: (1, 512, 768)).
        compression: ``"fp32"``, ``"fp16"``, ``"int8"`` or ``"topk"``. Defaults to ``"fp16"``.

    Returns:
        name -> array in insertion order; with ``int8`` each floating ``name`` is followed by
        ``name + SCALE_SUFFIX`` (float32, one per block); with ``topk`` by ``name + INDEX_SUFFIX`` and
        ``name + SHAPE_SUFFIX``.

    Raises:
        WireFormatError: unknown ``compression`` or a name that already ends in a reserved suffix.
    """
    _check_compression(compression)
    packed: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if name.endswith(_RESERVED):
            raise WireFormatError(f"Unable to pack {name!r} as names ending in {', '.join(_RESERVED)} are reserved")
        arr = _to_numpy(value)
        if not np.issubdtype(arr.dtype, np.floating):
            packed[name] = np.array(arr, order="C")
        elif compression == "fp32":
            packed[name] = np.array(arr, dtype=np.float32, order="C")
        elif compression == "fp16":
            with np.errstate(over="ignore"):
                packed[name] = np.array(arr, dtype=np.float16, order="C")
        elif compression == "int8":
            packed[name], packed[name + SCALE_SUFFIX] = _quantize_int8(arr)
        else:
            packed[name], packed[name + INDEX_SUFFIX], packed[name + SHAPE_SUFFIX] = _sparsify_topk(arr)
    return packed


def unpack_state(packed: Mapping[str, np.ndarray],
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Decode :func:`pack_state` output back to tensors; floating values come back as float32.

    The encoding is read from the arrays themselves (int8 arrays with a scale entry are dequantised, top-k
    values with their positions are scattered into zeros), so the receiver need not trust a separately sent
    compression name.

    Args:
        packed: what :func:`pack_state` produced (as received).
        shapes: the expected shape per name (the receiver's model). A top-k entry carries its own shape,
            which the receiver must not trust: without ``shapes`` a sender could declare a smaller tensor
            that broadcasts in a sum. Give it whenever ``topk`` may arrive.

    Raises:
        WireFormatError: an int8 array without its scale (or the reverse), a scale count that fits no
            encoding, top-k values without positions or shape, positions outside the tensor, or a decoded
            shape that differs from ``shapes``.
    """
    return {name: unpack_entry(packed, name, shapes) for name in packed_names(packed)}


def packed_names(packed: Mapping[str, np.ndarray]) -> list[str]:
    """The state's names in a :func:`pack_state` output (its int8 scales and top-k positions left out).

    Raises:
        WireFormatError: a scale or top-k entry whose own array is missing.
    """
    names = []
    for name in packed:
        if name.endswith(_RESERVED):
            base = name[: -len(next(s for s in _RESERVED if name.endswith(s)))]
            if base not in packed:
                kind = "int8" if name.endswith(SCALE_SUFFIX) else "top-k"
                raise WireFormatError(f"Unable to unpack {name!r} as its {kind} array is missing")
            continue
        names.append(name)
    return names


def unpack_entry(packed: Mapping[str, np.ndarray], name: str,
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> torch.Tensor:
    """Decode one entry of a :func:`pack_state` output (see :func:`unpack_state`, which decodes them all).

    Why one at a time: the server checks and folds a site's update tensor by tensor, so that only the
    update as received and one decoded tensor are alive, never the whole decoded update.

    Raises:
        WireFormatError: as :func:`unpack_state`.
    """
    arr = np.asarray(packed[name])
    scale_name = name + SCALE_SUFFIX
    if scale_name in packed:
        if arr.dtype != np.int8:
            raise WireFormatError(f"Unable to unpack {name!r} as it has a scale but dtype {arr.dtype}, not int8")
        scale = np.asarray(packed[scale_name], dtype=np.float32).reshape(-1)
        out = torch.from_numpy(_dequantize_int8(name, arr, scale))
    elif name + INDEX_SUFFIX in packed or name + SHAPE_SUFFIX in packed:
        if name + INDEX_SUFFIX not in packed or name + SHAPE_SUFFIX not in packed:
            raise WireFormatError(f"Unable to unpack {name!r} as it needs both {INDEX_SUFFIX!r} and "
                                  f"{SHAPE_SUFFIX!r} entries")
        out = torch.from_numpy(_densify_topk(name, arr, packed[name + INDEX_SUFFIX], packed[name + SHAPE_SUFFIX]))
    elif np.issubdtype(arr.dtype, np.floating):
        out = torch.from_numpy(np.array(arr, dtype=np.float32))
    else:
        out = torch.from_numpy(np.array(arr))
    if shapes is not None and name in shapes and tuple(out.shape) != tuple(shapes[name]):
        raise WireFormatError(f"Unable to unpack {name!r} as it decodes to shape {tuple(out.shape)}, "
                              f"not {tuple(shapes[name])}")
    return out


def packed_layout(
    state: Mapping[str, torch.Tensor | np.ndarray], compression: Compression | str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The (shape, dtype name) of every array :func:`pack_state` would produce, without packing.

    The server compares a reply's arrays against this to reject updates with wrong names, shapes or
    dtypes before decoding them.
    """
    _check_compression(compression)
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, value in state.items():
        shape = tuple(int(s) for s in value.shape)
        floating = value.is_floating_point() if isinstance(value, torch.Tensor) else \
            np.issubdtype(np.asarray(value).dtype, np.floating)
        if not floating:
            layout[name] = (shape, str(_to_numpy(value).dtype))
        elif compression == "int8":
            layout[name] = (shape, "int8")
            layout[name + SCALE_SUFFIX] = ((_num_blocks(math.prod(shape)),), "float32")
        elif compression == "topk":
            k = _topk_count(math.prod(shape))
            layout[name] = ((k,), "float16")
            layout[name + INDEX_SUFFIX] = ((k,), "int32")
            layout[name + SHAPE_SUFFIX] = ((len(shape),), "int64")
        else:
            layout[name] = (shape, "float16" if compression == "fp16" else "float32")
    return layout


def down_compression(compression: Compression | str) -> str:
    """How the server sends the global model for a run whose updates use ``compression``.

    The global is sent in fp32 when updates are fp32 and in fp16 otherwise (int8 and top-k are for
    updates, which error feedback corrects; the global itself is not quantised below fp16). Both sides use
    this: the server to pack, the site to know which layout to expect.
    """
    _check_compression(compression)
    return "fp32" if compression == "fp32" else "fp16"


def packed_nbytes(packed: Mapping[str, np.ndarray]) -> int:
    """Exact number of payload bytes of the packed arrays (headers of the transport not included)."""
    return int(sum(np.asarray(a).nbytes for a in packed.values()))


def state_nbytes(state: Mapping[str, torch.Tensor | np.ndarray]) -> int:
    """Bytes of a state dict in its own dtypes (the uncompressed reference for :func:`packed_nbytes`)."""
    total = 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            total += np.asarray(value).nbytes
    return int(total)


def select(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` named in ``names``, in ``state``'s order (e.g. only the trainable part).

    Raises:
        WireFormatError: naming the requested keys that ``state`` does not have.
    """
    wanted = set(names)
    missing = sorted(wanted - set(state))
    if missing:
        raise WireFormatError(f"Unable to select {len(missing)} keys as the state has no {missing[:5]}")
    return {k: v for k, v in state.items() if k in wanted}


def state_delta(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new - base`` for every key of ``new`` (float32 for floating tensors): what a site sends back."""
    out: dict[str, torch.Tensor] = {}
    for name, value in new.items():
        if name not in base:
            raise WireFormatError(f"Unable to compute the update of {name!r} as the base state has no such key")
        if value.is_floating_point():
            out[name] = value.detach().float() - base[name].detach().float()
        else:
            out[name] = value.detach().clone()
    return out


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + delta`` for the keys of ``delta``; other keys of ``base`` are copied unchanged.

    Integer entries of ``delta`` (buffers) replace the base value instead of being added.
    """
    out = {k: v.detach().clone() for k, v in base.items()}
    for name, d in delta.items():
        if name not in out:
            raise WireFormatError(f"Unable to apply the update of {name!r} as the model has no such key")
        if out[name].is_floating_point():
            out[name] = (out[name].float() + d.float()).to(out[name].dtype)
        else:
            out[name] = d.to(out[name].dtype).clone()
    return out


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all floating entries of an update (what the server bounds)."""
    return math.sqrt(sum(squared_norm(value) for value in delta.values() if value.is_floating_point()))


#: Values per float64 chunk of :func:`squared_norm`: an 8 MiB temporary, not a float64 copy of the tensor.
_NORM_CHUNK = 1 << 20


def squared_norm(value: torch.Tensor) -> float:
    """The sum of squares of one tensor, accumulated in float64 (one term of :func:`update_norm`).

    A chunk at a time: the server checks every reply's norm while it holds the global model, the running sum
    and the reply, and a float64 copy of a paper-size tensor (25 MiB for the 3.1 M-value patch embedding, and
    as much again for its square) would add to that peak.
    """
    total = 0.0
    flat = value.reshape(-1)
    for start in range(0, flat.numel(), _NORM_CHUNK):
        chunk = flat[start:start + _NORM_CHUNK]
        wide = chunk.double()
        total += float(torch.dot(wide, wide))
    return total
