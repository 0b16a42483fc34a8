"""The site's data card (``datacard.json`` in the cache): what a prepared cache holds, in aggregates only.

Counts of series, patients, studies, labels and splits, rejections by code, scanner makers, and histograms of
slice spacing, thickness, pixel spacing, slice count and lung volume. It is what a site may show the consortium
about its data (docs/site-data.md); nothing in it identifies a patient, study or series.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lungmae_core.config import PreprocessConfig
from lungmae_core.manifest import ManifestRow

# Fixed histogram bins so that data cards of different sites can be compared side by side.
_BINS: dict[str, tuple[float, ...]] = {
    "slice_spacing_mm": (0.0, 0.75, 1.25, 2.0, 3.0, 5.0, 10.0),
    "slice_thickness_mm": (0.0, 0.75, 1.25, 2.0, 3.0, 5.0, 10.0),
    "pixel_spacing_mm": (0.0, 0.5, 0.7, 0.9, 1.2, 2.0, 3.0),
    "n_slices": (0, 64, 128, 256, 512, 1024),
    "lung_volume_ml": (0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0),
}


def _histogram(values: Sequence[float | None], edges: Sequence[float]) -> dict[str, int]:
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [f">={edges[-1]:g}"]
    counts = Counter(labels[min(int(np.searchsorted(edges, v, side="right")) - 1, len(labels) - 1)]
                     for v in values if v is not None and v >= edges[0])
    return {label: counts.get(label, 0) for label in labels}



def data_card(site: str, rows: list[ManifestRow], rejections: Counter[str], cfg: PreprocessConfig,
              label_counts: dict[str, int], n_notes: Counter[str]) -> dict[str, Any]:
    """The site's ``datacard.json``: counts and histograms of the prepared cache, no identifiers at all.

    Args:
        site: the site's name.
        rows: every manifest row (accepted and rejected).
        rejections: rejected inputs by code (:data:`lungmae_core.dicom.REJECTION_CODES`), files included.
        cfg: the preprocessing that made the cache.
        label_counts: the label table's counts of label issues.
        n_notes: repairs made to series (e.g. resampled spacing), by kind.
    """
    accepted = [r for r in rows if r.accepted]
    return {
        "format": 1,
        "site": site,
        "preprocess": {"fingerprint": cfg.fingerprint(), "size": cfg.size},
        "counts": {
            "rows": len(rows),
            "series": sum(1 for r in rows if r.source in ("dicom", "nifti")),
            "accepted": len(accepted),
            "rejected": len(rows) - len(accepted),
            "patients": len({r.patient_id for r in accepted}),
            "studies": len({r.study_id for r in accepted}),
            "labelled": sum(1 for r in accepted if r.label),
            "unlabelled": sum(1 for r in accepted if not r.label),
        },
        "sources": dict(Counter(r.source for r in accepted)),
        "rejections": dict(sorted(rejections.items())),
        "repairs": dict(sorted(n_notes.items())),
        "manufacturers": dict(sorted(Counter(r.manufacturer or "unknown" for r in accepted).items())),
        "labels": dict(sorted(Counter(r.label for r in accepted if r.label).items())),
        "splits": dict(sorted(Counter(f"{r.split}" for r in accepted if r.label).items())),
        "label_issues": label_counts,
        "histograms": {
            "slice_spacing_mm": _histogram([r.spacing_d_mm for r in accepted], _BINS["slice_spacing_mm"]),
            "slice_thickness_mm": _histogram([r.slice_thickness_mm for r in accepted], _BINS["slice_thickness_mm"]),
            "pixel_spacing_mm": _histogram([r.spacing_h_mm for r in accepted], _BINS["pixel_spacing_mm"]),
            "n_slices": _histogram([r.n_slices for r in accepted], _BINS["n_slices"]),
            "lung_volume_ml": _histogram([r.lung_volume_ml for r in accepted], _BINS["lung_volume_ml"]),
        },
    }
