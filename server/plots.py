"""Matplotlib figures of a federated run, returned as PNG ``data:`` URIs for the self-contained report.

Every function draws one figure with the non-interactive Agg backend (no display, safe in threads of a
headless coordinator), encodes it as PNG and closes it, so the report page can embed the image inline
(``<img src="data:image/png;base64,...">``) and needs no file next to it and no network.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: the coordinator has no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = [
    "figure_to_data_uri",
    "loss_curves",
    "participation_chart",
    "bytes_chart",
    "epsilon_chart",
    "confusion_matrix_figure",
    "reconstruction_figure",
    "orthogonal_slices",
]

# One colour per site, stable across figures: the same site has the same colour everywhere on the page.
_SITE_COLOURS = plt.get_cmap("tab10").colors
_DPI = 96


def figure_to_data_uri(fig: Figure) -> str:
    """Encode ``fig`` as a base64 PNG ``data:`` URI and close it (figures are not kept open)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _site_colour(index: int) -> tuple[float, float, float]:
    return _SITE_COLOURS[index % len(_SITE_COLOURS)]


def _round_axis(ax: plt.Axes, rounds: Sequence[int]) -> None:
    """Integer server rounds on the x axis; a single round is centred instead of spread over +-0.1."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    distinct = sorted(set(rounds))
    if len(distinct) == 1:
        ax.set_xlim(distinct[0] - 1, distinct[0] + 1)


def loss_curves(
    per_site: Mapping[str, Sequence[tuple[int, float]]],
    aggregated: Sequence[tuple[int, float]],
    *,
    title: str,
    ylabel: str = "loss",
    site_order: Sequence[str] | None = None,
    reference: Sequence[tuple[int, float]] | None = None,
    reference_label: str = "average patch (baseline)",
) -> str:
    """Training loss against server round: one thin line per site and a thick line for the aggregate.

    Args:
        per_site: site name -> ``[(server_round, loss), ...]``; rounds a site missed are simply absent.
        aggregated: ``[(server_round, loss), ...]`` of the example-weighted mean over the sites.
        title: the figure title (e.g. ``"pretrain (MAE, lung-weighted L1)"``).
        ylabel: label of the y axis. Defaults to ``"loss"``.
        site_order: order of the sites, so colours agree with the other figures. Defaults to sorted names.
        reference: an optional ``[(server_round, value), ...]`` drawn dashed, e.g. the trivial
            predictor's loss the curve must get below.
        reference_label: legend text of ``reference``.

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    order = list(site_order) if site_order is not None else sorted(per_site)
    for i, site in enumerate(order):
        points = sorted(per_site.get(site, ()))
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color=_site_colour(i), label=site)
    if aggregated:
        xs, ys = zip(*sorted(aggregated))
        ax.plot(xs, ys, marker="s", markersize=4, linewidth=2.6, color="black", label="aggregated")
    if reference:
        xs, ys = zip(*sorted(reference))
        ax.plot(xs, ys, linestyle="--", marker="x", markersize=7, linewidth=2.0, color="#c0392b",
                label=reference_label)
    ax.set_xlabel("server round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _round_axis(ax, [r for points in [*per_site.values(), aggregated, reference or ()] for r, _ in points])
    ax.legend(fontsize="small", loc="best")
    return figure_to_data_uri(fig)


def participation_chart(
    rounds: Sequence[int],
    counts: Mapping[str, Sequence[int]],
) -> str:
    """Grouped bars per server round: how many sites were sampled, replied, failed, rejected.

    Args:
        rounds: the server rounds, in order.
        counts: ``{"sampled": [...], "replied": [...], "failed": [...], "rejected": [...]}``, each aligned
            with ``rounds`` (any subset of these keys, drawn in this order).

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    colours = {"sampled": "#7f8c8d", "replied": "#27ae60", "failed": "#c0392b", "rejected": "#e67e22"}
    keys = [k for k in colours if k in counts]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    x = np.arange(len(rounds), dtype=float)
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, counts[key], width, label=key, color=colours[key])
    ax.set_xticks(x, [str(r) for r in rounds])
    ax.set_xlabel("server round")
    ax.set_ylabel("sites")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("participation per round")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=len(keys), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return figure_to_data_uri(fig)


def bytes_chart(rounds: Sequence[int], up: Sequence[float], down: Sequence[float]) -> str:
    """Side-by-side bars of bytes sent to the sites (down) and received from them (up) per round, in MB.

    Args:
        rounds: the server rounds, in order.
        up: bytes received from all sites in each round (site -> server), aligned with ``rounds``.
        down: bytes sent to all sites in each round (server -> site), aligned with ``rounds``.

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    x = np.arange(len(rounds), dtype=float)
    ax.bar(x - 0.2, np.asarray(down, dtype=float) / 1e6, 0.4, label="down (server to sites)", color="#2980b9")
    ax.bar(x + 0.2, np.asarray(up, dtype=float) / 1e6, 0.4, label="up (sites to server)", color="#8e44ad")
    ax.set_xticks(x, [str(r) for r in rounds])
    ax.set_xlabel("server round")
    ax.set_ylabel("MB (10^6 bytes)")
    ax.set_title("bytes on the wire per round")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return figure_to_data_uri(fig)


def epsilon_chart(
    per_site: Mapping[str, Sequence[tuple[int, float]]],
    *,
    site_order: Sequence[str] | None = None,
) -> str:
    """Privacy budget spent so far (epsilon, the running total each site reports) against server round.

    Args:
        per_site: site name -> ``[(server_round, total epsilon), ...]``.
        site_order: order of the sites, so colours agree with the loss curves. Defaults to sorted names.

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    order = list(site_order) if site_order is not None else sorted(per_site)
    for i, site in enumerate(order):
        points = sorted(per_site.get(site, ()))
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, color=_site_colour(i), label=site)
    ax.set_xlabel("server round")
    ax.set_ylabel("epsilon spent (total)")
    ax.set_title("differential privacy: epsilon spent per site")
    ax.grid(True, alpha=0.3)
    _round_axis(ax, [r for points in per_site.values() for r, _ in points])
    ax.legend(fontsize="small")
    return figure_to_data_uri(fig)


def confusion_matrix_figure(matrix: Sequence[Sequence[float]], class_names: Sequence[str], *, title: str) -> str:
    """Confusion matrix as a heat map with the count in every cell (rows: true class, columns: predicted).

    Args:
        matrix: ``(C, C)`` counts, ``matrix[i][j]`` = scans of true class ``i`` predicted as ``j``.
        class_names: the ``C`` class names, in label order.
        title: the figure title.

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    m = np.asarray(matrix, dtype=float)
    assert m.ndim == 2 and m.shape[0] == m.shape[1] == len(class_names), (m.shape, len(class_names))
    # Colour by row fraction (recall per class) so rare classes are as readable as common ones.
    row_sum = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, row_sum, out=np.zeros_like(m), where=row_sum > 0)
    size = 1.2 + 0.9 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:g}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=11)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, list(class_names), rotation=30, ha="right")
    ax.set_yticks(ticks, list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return figure_to_data_uri(fig)


def orthogonal_slices(volume: np.ndarray, centre: Sequence[int] | None = None) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """Three orthogonal slices of a canonical ``(D, H, W)`` volume through ``centre``, oriented for display.

    D runs inferior -> superior, H anterior -> posterior and W patient right -> left (DICOM LPS), so the
    axial slice is shown as a radiologist would (anterior up, the patient's right on the image's left) and
    the coronal and sagittal slices have the head at the top.

    Args:
        volume: ``(D, H, W)`` array.
        centre: ``(d, h, w)`` voxel the three planes pass through. Defaults to the volume's centre.

    Returns:
        ``(axial (H, W), coronal (D, W), sagittal (D, H))``, the last two flipped so superior is up.
    """
    assert volume.ndim == 3, volume.shape
    d, h, w = (s // 2 for s in volume.shape) if centre is None else (int(c) for c in centre)
    axial = volume[d, :, :]
    coronal = volume[::-1, h, :]
    sagittal = volume[::-1, :, w]
    return axial, coronal, sagittal


def reconstruction_figure(
    image: np.ndarray,
    masked: np.ndarray,
    reconstruction: np.ndarray,
    *,
    title: str,
    centre: Sequence[int] | None = None,
) -> str:
    """A 3x3 grid: rows axial / coronal / sagittal, columns input / masked input / reconstruction.

    Args:
        image: ``(D, H, W)`` float, the preprocessed input in [0, 1] (HU window [-1000, 200]).
        masked: ``(D, H, W)`` float, the input with masked patches blanked (shown as NaN -> grey).
        reconstruction: ``(D, H, W)`` float, visible patches from the input, masked ones predicted.
        title: the figure title.
        centre: ``(d, h, w)`` voxel the slices pass through (e.g. in the lungs). Defaults to the centre.

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    assert image.shape == masked.shape == reconstruction.shape, (image.shape, masked.shape, reconstruction.shape)
    cmap = plt.get_cmap("gray").with_extremes(bad="#d35400")  # masked patches: orange, clearly not anatomy
    columns = (("input", image), ("masked input", masked), ("reconstruction", reconstruction))
    rows = ("axial", "coronal", "sagittal")
    fig, axes = plt.subplots(3, 3, figsize=(8.4, 8.4))
    for c, (col_name, vol) in enumerate(columns):
        for r, sl in enumerate(orthogonal_slices(np.asarray(vol, dtype=float), centre)):
            ax = axes[r, c]
            ax.imshow(np.ma.masked_invalid(sl), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_name)
            if c == 0:
                ax.set_ylabel(rows[r])
    fig.suptitle(title)
    fig.tight_layout()
    return figure_to_data_uri(fig)
