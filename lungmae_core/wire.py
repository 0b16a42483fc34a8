"""Packing model state dicts for the wire: fp32, fp16 (default) or 8-bit, with exact byte counts.

Model weights are the only thing that leaves a site, and on a hospital uplink they are the bulk of the
traffic (the paper's MAE is ~465 MB in fp32). This module turns a state dict into a flat mapping of NumPy
arrays in one of three encodings and back, framework-free so that both the ClientApp and the ServerApp
(and a notebook) can use it; the Flower side only wraps the result in an ``ArrayRecord``.

Encodings (``compression``):
    * ``fp32``: floating tensors as float32; exact.
    * ``fp16``: floating tensors as float16; half the bytes, relative error ~5e-4. Values beyond
      +/-65504 become inf, which the server's update checks then reject as non-finite.
    * ``int8``: symmetric per-tensor quantisation; each floating tensor ``name`` becomes an int8 array
      ``name`` plus a float32 scale ``name#int8-scale`` of shape (1,); about a quarter of the fp32 bytes.
      Meant for *updates* (local - global), whose per-tensor range is small; do not use it for weights.

Non-floating tensors (integer buffers) travel unchanged in every encoding.

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

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch

from lungmae_core.errors import LungMAEError

__all__ = [
    "COMPRESSIONS",
    "Compression",
    "SCALE_SUFFIX",
    "WireFormatError",
    "pack_state",
    "unpack_state",
    "packed_layout",
    "packed_nbytes",
    "state_nbytes",
    "state_delta",
    "apply_delta",
    "select",
    "update_norm",
]

Compression = Literal["fp32", "fp16", "int8"]
COMPRESSIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "#int8-scale"
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


def _quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-tensor quantisation: ``x ~ q * scale`` with ``q`` in [-127, 127]."""
    x32 = x.astype(np.float32, copy=False)
    peak = float(np.max(np.abs(x32))) if x32.size else 0.0
    if not np.isfinite(peak):
        # Keep the non-finite value visible to the receiver's checks instead of hiding it in a clip.
        return np.zeros(x32.shape, np.int8), np.array([np.inf], np.float32)
    scale = peak / _INT8_MAX if peak > 0 else 1.0
    q = np.clip(np.rint(x32 / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, np.array([scale], np.float32)


def pack_state(
    state: Mapping[str, torch.Tensor | np.ndarray], compression: Compression | str = "fp16"
) -> dict[str, np.ndarray]:
    """Encode a state dict into contiguous NumPy arrays for an ``ArrayRecord``.

    Args:
        state: tensor or array per parameter name, any shapes (e.g. ``encoder.pos_embed.pos``: (1, 512, 768)).
        compression: ``"fp32"``, ``"fp16"`` or ``"int8"``. Defaults to ``"fp16"``.

    Returns:
        name -> array in insertion order; with ``int8`` each floating ``name`` is followed by
        ``name + SCALE_SUFFIX`` (float32, shape (1,)).

    Raises:
        WireFormatError: unknown ``compression`` or a name that already ends in the scale suffix.
    """
    _check_compression(compression)
    packed: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if name.endswith(SCALE_SUFFIX):
            raise WireFormatError(f"Unable to pack {name!r} as names ending in {SCALE_SUFFIX!r} are reserved")
        arr = _to_numpy(value)
        if not np.issubdtype(arr.dtype, np.floating):
            packed[name] = np.array(arr, order="C")
        elif compression == "fp32":
            packed[name] = np.array(arr, dtype=np.float32, order="C")
        elif compression == "fp16":
            with np.errstate(over="ignore"):
                packed[name] = np.array(arr, dtype=np.float16, order="C")
        else:
            packed[name], packed[name + SCALE_SUFFIX] = _quantize_int8(arr)
    return packed


def unpack_state(packed: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Decode :func:`pack_state` output back to tensors; floating values come back as float32.

    The encoding is read from the arrays themselves (int8 arrays with a scale entry are dequantised), so
    the receiver need not trust a separately sent compression name.

    Raises:
        WireFormatError: an int8 array without its scale, or a scale without its array.
    """
    out: dict[str, torch.Tensor] = {}
    for name, arr in packed.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in packed:
                raise WireFormatError(f"Unable to unpack {name!r} as its int8 array is missing")
            continue
        arr = np.asarray(arr)
        scale_name = name + SCALE_SUFFIX
        if scale_name in packed:
            if arr.dtype != np.int8:
                raise WireFormatError(f"Unable to unpack {name!r} as it has a scale but dtype {arr.dtype}, not int8")
            scale = np.asarray(packed[scale_name], dtype=np.float32).reshape(-1)
            if scale.size != 1:
                raise WireFormatError(f"Unable to unpack {name!r} as its scale has {scale.size} values, not 1")
            with np.errstate(invalid="ignore", over="ignore"):
                out[name] = torch.from_numpy(arr.astype(np.float32) * scale[0])
        elif np.issubdtype(arr.dtype, np.floating):
            out[name] = torch.from_numpy(np.array(arr, dtype=np.float32))
        else:
            out[name] = torch.from_numpy(np.array(arr))
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
            layout[name + SCALE_SUFFIX] = ((1,), "float32")
        else:
            layout[name] = (shape, "float16" if compression == "fp16" else "float32")
    return layout


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
    sq = 0.0
    for value in delta.values():
        if value.is_floating_point():
            sq += float(torch.sum(value.double() ** 2))
    return sq ** 0.5
