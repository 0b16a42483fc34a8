"""Step 3 of DICOM intake: decode the planned slices and assemble the HU volume from geometry, never from
file order. See :mod:`lungmae_core.dicom`.
"""

from __future__ import annotations

import logging

import numpy as np

from lungmae_core.dicom.errors import SeriesRejected
from lungmae_core.dicom.index import DicomSeries, InstanceHeader, _float, _quiet_pydicom
from lungmae_core.dicom.selection import SeriesRules, SlicePlan, _unit, plan_series
from lungmae_core.volume import Volume, to_canonical

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- volumes

def _decode(header: InstanceHeader, index: int, total: int) -> tuple[np.ndarray, float, float]:
    """Read a file's stored pixel values and its top-level Rescale Slope/Intercept.

    Returns:
        ``pixels``: ``(rows, columns)``, or ``(frames, rows, columns)`` for a multi-frame object; slope;
        intercept (NaN when absent: frames carry their own).
    """
    import pydicom

    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(header.path)
            pixels = ds.pixel_array
            slope = _float(ds.get("RescaleSlope"))
            intercept = _float(ds.get("RescaleIntercept"))
    except (OSError, EOFError) as exc:
        raise SeriesRejected("truncated", f"slice {index} of {total} cannot be read ({type(exc).__name__}); "
                                          "re-copy the series") from exc
    except Exception as exc:  # decoder plugins raise their own types
        text = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise SeriesRejected("decode-failed", f"the pixel data of slice {index} of {total} cannot be decoded "
                                              f"({type(exc).__name__}: {text})") from exc
    if header.frame is not None and header.number_of_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    nan = float("nan")  # frames carry their own rescale; a classic slice without one was rejected earlier
    return pixels, nan if slope is None else slope, nan if intercept is None else intercept


def _read_slice(header: InstanceHeader, index: int, total: int,
                decoded: dict[str, tuple[np.ndarray, float, float]]) -> np.ndarray:
    """One slice in HU: ``(rows, columns)`` float32 = stored value * Rescale Slope + Rescale Intercept.

    ``decoded`` keeps multi-frame files decoded once for all their frames.
    """
    if header.frame is None:
        pixels, slope, intercept = _decode(header, index, total)
    else:
        if header.path not in decoded:
            decoded[header.path] = _decode(header, index, total)
        frames, slope, intercept = decoded[header.path]
        if frames.ndim != 3 or header.frame >= frames.shape[0]:
            raise SeriesRejected("decode-failed", f"frame {header.frame + 1} of slice {index} of {total} is not in "
                                                  f"the decoded pixel data (shape {frames.shape})")
        pixels = frames[header.frame]
        if header.rescale is not None:
            slope, intercept = header.rescale
    if pixels.shape != (header.rows, header.columns):
        raise SeriesRejected("decode-failed", f"slice {index} of {total} decodes to shape {pixels.shape}, not "
                                              f"(Rows, Columns) = ({header.rows}, {header.columns})")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _resample_slices(stack: np.ndarray, positions: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation along D onto ``positions[0] + k * spacing``.

    stack: (N, H, W) float32 at increasing ``positions`` (N,) -> (M, H, W) float32.
    """
    n_out = int(round((positions[-1] - positions[0]) / spacing)) + 1
    targets = positions[0] + spacing * np.arange(n_out)
    targets = np.clip(targets, positions[0], positions[-1])
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((targets - positions[lower]) / (positions[upper] - positions[lower])).astype(np.float32)
    weight = weight[:, None, None]
    out: np.ndarray = (1.0 - weight) * stack[lower] + weight * stack[upper]  # (M, H, W)
    return out


def load_series(series: DicomSeries, rules: SeriesRules = SeriesRules(), plan: SlicePlan | None = None) -> Volume:
    """Assemble a series into a canonical HU volume from its geometry.

    Args:
        series: the instances of one series.
        rules: used to make the plan when ``plan`` is not given.
        plan: the result of :func:`plan_series` when already computed.

    Returns:
        A :class:`Volume` with ``hu: (D, H, W) float32`` in canonical LPS orientation (``to_canonical``).
        Affine columns: D along the slice normal times the spacing, H along the column direction times
        (0028,0030)[0] (row spacing), W along the row direction times (0028,0030)[1].

    Raises:
        SeriesRejected: for every check of :func:`plan_series`, and for pixel data that cannot be decoded.

    Examples:
        >>> vol = load_series(series)          # doctest: +SKIP
        >>> vol.hu.shape, vol.spacing_mm       # doctest: +SKIP
        ((100, 160, 160), (2.5, 1.25, 1.25))
    """
    plan = plan or plan_series(series, rules)
    inst = series.instances
    total = len(plan.order)
    stack = np.empty((total, plan.rows, plan.columns), dtype=np.float32)  # (N, H, W)
    decoded: dict[str, tuple[np.ndarray, float, float]] = {}
    for k, i in enumerate(plan.order):
        stack[k] = _read_slice(inst[i], k + 1, total, decoded)
    decoded.clear()
    positions = np.asarray(plan.positions_mm)
    if plan.resample:
        stack = _resample_slices(stack, positions, plan.spacing_mm)
    first = inst[plan.order[0]]
    orient = np.asarray(first.orientation, dtype=np.float64)
    row_dir, col_dir = _unit(orient[:3]), _unit(orient[3:])
    normal = _unit(np.cross(row_dir, col_dir))
    affine = np.eye(4)
    affine[:3, 0] = normal * plan.spacing_mm
    affine[:3, 1] = col_dir * plan.pixel_spacing[0]
    affine[:3, 2] = row_dir * plan.pixel_spacing[1]
    affine[:3, 3] = np.asarray(first.position, dtype=np.float64)
    if not np.all(np.isfinite(stack)):
        raise SeriesRejected("decode-failed", "the HU values are not all finite after applying Rescale "
                                              "Slope/Intercept")
    return to_canonical(Volume(stack, affine))
