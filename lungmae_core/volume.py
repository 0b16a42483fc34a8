"""A CT volume in Hounsfield units with its voxel-to-patient affine, and reorientation to canonical LPS.

Every data source (DICOM, NIfTI, phantoms) produces a :class:`Volume`; :func:`to_canonical` then brings it to
the one orientation the rest of the pipeline assumes, so that "slice 0" is always the most inferior slice and
"column 0" the patient's right side, whatever the scanner or patient position was.

Convention (docs/CONTRACTS.md): arrays are ``(D, H, W)``; the affine maps ``[d, h, w, 1]`` to ``[x, y, z, 1]`` in
DICOM patient coordinates (LPS, millimetres). Canonical means the axes ``(D, H, W)`` point to ``(+S, +P, +L)``,
i.e. the affine's direction part is a positive diagonal up to axis order ``(z, y, x)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lungmae_core.errors import InvalidSeriesError

__all__ = ["Volume", "to_canonical", "canonical_affine", "orientation_code", "sample_linear"]

# Which LPS world axis each canonical array axis must point along: D -> z (S), H -> y (P), W -> x (L).
_CANONICAL_WORLD_AXIS = (2, 1, 0)
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # (negative, positive) direction of world x, y, z in LPS


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume: HU values and where each voxel sits in the patient.

    Args:
        hu: ``(D, H, W)`` float32, Hounsfield units.
        affine: ``(4, 4)`` float64, maps voxel indices ``[d, h, w, 1]`` to LPS millimetres ``[x, y, z, 1]``.

    Raises:
        InvalidSeriesError: if the array is not 3D, the affine not 4x4 and invertible, or values not finite.

    Examples:
        >>> v = Volume.from_spacing(np.zeros((100, 160, 160), np.float32), (2.5, 0.8, 0.8))
        >>> v.spacing_mm
        (2.5, 0.8, 0.8)
    """

    hu: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise InvalidSeriesError(f"Unable to use the volume as it has {hu.ndim} dimensions; expected 3 (D, H, W)")
        if min(hu.shape) < 1:
            raise InvalidSeriesError(f"Unable to use the volume as its shape {hu.shape} is empty")
        if hu.dtype != np.float32:
            hu = hu.astype(np.float32)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InvalidSeriesError(
                f"Unable to use the volume as its affine has shape {affine.shape}; expected (4, 4)")
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InvalidSeriesError("Unable to use the volume as its affine is not finite and invertible")
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "affine", affine)

    @classmethod
    def from_spacing(cls, hu: np.ndarray, spacing_mm: Sequence[float],
                     origin_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> Volume:
        """A volume that is already canonical, with voxel spacing ``(d, h, w)`` in mm and LPS origin ``(x, y, z)``."""
        return cls(hu, canonical_affine(spacing_mm, origin_mm))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along ``(D, H, W)`` in millimetres (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three letters naming where each array axis points, e.g. ``"SPL"`` when canonical."""
        return orientation_code(self.affine)


def canonical_affine(spacing_mm: Sequence[float] | np.ndarray,
                     origin_mm: Sequence[float] | np.ndarray = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The affine of a canonical volume: D along +z (S), H along +y (P), W along +x (L).

    Args:
        spacing_mm: ``(d, h, w)`` voxel size in mm.
        origin_mm: LPS position ``(x, y, z)`` of voxel ``[0, 0, 0]`` in mm.
    """
    sd, sh, sw = (float(s) for s in spacing_mm)
    if min(sd, sh, sw) <= 0:
        raise InvalidSeriesError(f"Unable to use voxel spacing {tuple(spacing_mm)} mm as it must be positive")
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = sd, sh, sw
    affine[:3, 3] = origin_mm
    affine[3, 3] = 1.0
    return affine


def _axis_map(affine: np.ndarray) -> tuple[list[int], list[int]]:
    """For each array axis: the world axis it mostly points along and the sign of that direction."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0, keepdims=True)
    world = [int(i) for i in np.argmax(np.abs(directions), axis=0)]
    if len(set(world)) != 3:
        raise InvalidSeriesError(
            "Unable to reorient the volume as two of its axes point along the same patient axis "
            f"(direction cosines {np.round(directions, 3).tolist()})")
    signs = [1 if directions[w, a] > 0 else -1 for a, w in enumerate(world)]
    return world, signs


def orientation_code(affine: np.ndarray) -> str:
    """Letters for the direction each array axis points to, in LPS terms (``"SPL"`` is canonical)."""
    world, signs = _axis_map(np.asarray(affine, dtype=np.float64))
    return "".join(_AXIS_LETTERS[w][1 if s > 0 else 0] for w, s in zip(world, signs, strict=True))


def to_canonical(volume: Volume) -> Volume:
    """Permute and flip the array axes so that ``(D, H, W)`` points to ``(+S, +P, +L)``.

    No interpolation happens: only axis permutations and flips, with the affine updated so every voxel keeps
    its patient position. Slightly oblique volumes are assigned to the closest patient axis (their affine
    keeps the true obliquity); rejecting tilted acquisitions is the reader's job.

    Args:
        volume: any orientation, e.g. a feet-first series (``"ILP"`` style axes) or NIfTI converted to LPS.

    Returns:
        A canonical :class:`Volume` (the same object if it already is canonical).

    Raises:
        InvalidSeriesError: if two axes point along the same patient axis.
    """
    world, signs = _axis_map(volume.affine)
    # order[k] = which input axis becomes output axis k
    order = [world.index(_CANONICAL_WORLD_AXIS[k]) for k in range(3)]
    if order == [0, 1, 2] and all(s > 0 for s in signs):
        return volume
    hu = np.transpose(volume.hu, order)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, order]
    flips = [k for k in range(3) if signs[order[k]] < 0]
    if flips:
        hu = np.flip(hu, axis=tuple(flips))
        for k in flips:
            # new index i' = n - 1 - i  =>  origin moves to the old last voxel, direction negates
            affine[:3, 3] += affine[:3, k] * (hu.shape[k] - 1)
            affine[:3, k] = -affine[:3, k]
    return Volume(np.ascontiguousarray(hu), affine)


def sample_linear(array: np.ndarray, coords: Sequence[np.ndarray]) -> np.ndarray:
    """Trilinear sampling of ``array`` on the grid given by one coordinate vector per axis.

    The map from output to input is axis-aligned, so trilinear interpolation factorises into three 1D
    linear interpolations; doing them one axis at a time (largest reduction first) touches each input voxel
    once and needs no full 3D coordinate arrays, which is what makes the preprocessing fast.

    Args:
        array: ``(D, H, W)`` input (float32, or anything castable to it).
        coords: three 1D arrays of fractional input indices for the output axes; values outside
            ``[0, n - 1]`` are clamped to the edge (edge replication).

    Returns:
        ``(len(coords[0]), len(coords[1]), len(coords[2]))`` float32.

    Examples:
        >>> a = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
        >>> sample_linear(a, [np.array([0.5])] * 3).item()
        3.5
    """
    assert array.ndim == 3 and len(coords) == 3
    out = np.asarray(array)
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    # Shrink the axis with the largest reduction factor first: later passes then work on less data.
    order = sorted(range(3), key=lambda k: len(coords[k]) / max(array.shape[k], 1))
    for axis in order:
        out = _linear_along(out, np.asarray(coords[axis], dtype=np.float64), axis)
    return out


def _linear_along(a: np.ndarray, c: np.ndarray, axis: int) -> np.ndarray:
    n = a.shape[axis]
    if n == 1:
        return np.repeat(a, len(c), axis=axis)
    c = np.clip(c, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(c).astype(np.intp), n - 2)
    w = (c - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = len(c)
    w = w.reshape(shape)
    lo = np.take(a, i0, axis=axis)
    hi = np.take(a, i0 + 1, axis=axis)
    hi -= lo
    hi *= w
    lo += hi
    out: np.ndarray = lo
    return out
