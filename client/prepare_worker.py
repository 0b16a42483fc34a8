"""The worker step of ``lungmae site prepare``: one series (or NIfTI file) -> one cached sample.

:func:`run_workers` runs :func:`_process` over the planned series, in worker processes when asked; each result
is a plain dict (accepted with its figures, or rejected with a code and a reason without identifiers), so a
bad series or a crashed worker never stops the others. :mod:`client.prepare` plans the work and writes the
manifest.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

from lungmae_core.cache import write_sample
from lungmae_core.dicom import load_series
from lungmae_core.errors import InvalidSeriesError

logger = logging.getLogger(__name__)


def _rejection_code(exc: InvalidSeriesError) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    return "implausible-lungs" if "lung" in str(exc).lower() else "nifti-invalid"


def _where(exc: BaseException) -> str:
    """``at module.py:123 in function`` for the innermost frame (code location only: no data, no paths)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"at {os.path.basename(last.filename)}:{last.lineno} in {last.name}"


def _process(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: load one series, preprocess it, write its sample. Returns a result dict, never raises.

    A top-level function so that ProcessPoolExecutor can pickle it; identifiers only travel inside ``task``.
    """
    from lungmae_core.nifti import load_nifti
    from lungmae_core.preprocess import preprocess_volume

    try:
        if task["series"] is not None:
            volume = load_series(task["series"], task["rules"], task["plan"])
        else:
            volume = load_nifti(task["nifti_path"])
        sample = preprocess_volume(volume, task["preprocess"])
        info = {
            "n_slices": int(volume.shape[0]),
            "spacing_mm": [float(s) for s in volume.spacing_mm],
            "lung_volume_ml": sample.qc.get("lung_volume_ml"),
            **{k: sample.qc.get(k) for k in ("hu_mean", "hu_std", "hu_p05", "hu_p50", "hu_p95")},
        }
        write_sample(task["cache_dir"], task["key"], sample, {"series_id": task["series_id"], "info": info,
                                                              "notes": list(task["notes"])})
        return {"ok": True, "info": info}
    except InvalidSeriesError as exc:
        return {"ok": False, "code": _rejection_code(exc), "reason": str(exc), "final": True}
    except OSError as exc:
        logger.debug("I/O error on %s", task["series_id"], exc_info=True)
        cause = exc.strerror or "I/O error"
        return {"ok": False, "code": "unreadable", "reason": f"a file could not be read ({cause})", "final": False}
    except Exception as exc:  # a bug: keep going with the other series, say what happened and where
        logger.debug("unexpected error on %s", task["series_id"], exc_info=True)
        return {"ok": False, "code": "internal-error", "reason": f"{type(exc).__name__} {_where(exc)} while "
                                                                 "preparing it; run with -vv and report the log",
                "final": False}


def run_workers(tasks: list[dict[str, Any]], workers: int, progress: bool) -> dict[str, dict[str, Any]]:
    """Run :func:`_process` over ``tasks`` (in ``workers`` processes when > 1); results by series id."""
    results: dict[str, dict[str, Any]] = {}
    if not tasks:
        return results
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="Preprocessing series", unit="series")
    try:
        if workers <= 1 or len(tasks) == 1:
            for task in tasks:
                results[task["series_id"]] = _process(task)
                if bar is not None:
                    bar.update(1)
        else:
            from concurrent.futures.process import BrokenProcessPool

            with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                futures: dict[Future[dict[str, Any]], str] = {pool.submit(_process, task): task["series_id"]
                                                               for task in tasks}
                for future in as_completed(futures):
                    try:
                        results[futures[future]] = future.result()
                    except BrokenProcessPool:
                        results[futures[future]] = {
                            "ok": False, "code": "internal-error", "final": False,
                            "reason": "its worker process died (out of memory?); retry with fewer --workers"}
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results
