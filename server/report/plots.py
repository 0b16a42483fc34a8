"""Matplotlib figures of a federated run, returned as PNG ``data:`` URIs for the self-contained report.

Every function draws one figure with the non-interactive Agg backend (no display, safe in threads of a
headless coordinator), encodes it as PNG and closes it, so the report page can embed the image inline
(``<img src="data:image/png;base64,...">``) and needs no file next to it and no network.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: the coordinator has no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

__all__ = [
    "figure_to_data_uri",
    "loss_curves",
    "participation_chart",
    "bytes_chart",
    "epsilon_chart",
    "confusion_matrix_figure",
    "cross_site_heatmap",
    "metric_vs_labels",
    "reconstruction_figure",
    "orthogonal_slices",
]

# One colour per site, stable across figures: the same site has the same colour everywhere on the page.
_SITE_COLOURS = [to_rgb(plt.get_cmap("tab10")(i)) for i in range(10)]
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


def _round_axis(ax: Axes, rounds: Sequence[int]) -> None:
    """Integer server rounds on the x axis; a single round is centred instead of spread over +-0.1."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    distinct = sorted(set(rounds))
    if len(distinct) == 1:
        ax.set_xlim(distinct[0] - 1, distinct[0] + 1)


def _per_site_lines(ax: Axes, per_site: Mapping[str, Sequence[tuple[int, float]]],
                    site_order: Sequence[str] | None, **style: Any) -> None:
    """One line per site against server round, in ``site_order`` (default: sorted names) so that a site keeps
    its colour across the figures; a site without points keeps its colour slot but draws nothing."""
    order = list(site_order) if site_order is not None else sorted(per_site)
    for i, site in enumerate(order):
        points = sorted(per_site.get(site, ()))
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, color=_site_colour(i), label=site, **style)


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
    _per_site_lines(ax, per_site, site_order, linewidth=1.2)
    if aggregated:
        xs, ys = zip(*sorted(aggregated), strict=True)
        ax.plot(xs, ys, marker="s", markersize=4, linewidth=2.6, color="black", label="aggregated")
    if reference:
        xs, ys = zip(*sorted(reference), strict=True)
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
    locator = ax.yaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # the default (AutoLocator) is one
        locator.set_params(integer=True)
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
    _per_site_lines(ax, per_site, site_order)
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


def cross_site_heatmap(values: Sequence[Sequence[float | None]], models: Sequence[str], data_sites: Sequence[str],
                       *, title: str, counts: Sequence[Sequence[int | None]] | None = None,
                       suppressed: Sequence[Sequence[bool]] | None = None) -> str:
    """A models x data sites matrix of one metric in [0, 1], value (and scan count) written in every cell.

    Args:
        values: ``values[i][j]``: model ``models[i]`` on ``data_sites[j]``'s test split; None = not evaluated
            (or, where the cell has a count, undefined: e.g. ROC AUC on a one-class split).
        models: row labels (the model: global or a site's local copy).
        data_sites: column labels (whose test data).
        title: the figure title.
        counts: test scans per cell, shown as ``n=..``; None where unknown or withheld.
        suppressed: cells whose count the data site withheld (shown as ``n<min``).

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    assert m.shape == (len(models), len(data_sites)), (m.shape, len(models), len(data_sites))
    width = 2.2 + 1.25 * len(data_sites)
    fig, ax = plt.subplots(figsize=(min(width, 10.0), 1.3 + 0.6 * len(models)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#e6e9ec")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            evaluated = (counts is not None and counts[i][j] is not None) or (suppressed is not None
                                                                               and suppressed[i][j])
            text = ("undefined" if evaluated else "not\nevaluated") if np.isnan(m[i, j]) else f"{m[i, j]:.2f}"
            if not np.isnan(m[i, j]):
                if suppressed is not None and suppressed[i][j]:
                    text += "\nn<min"
                elif counts is not None and counts[i][j] is not None:
                    text += f"\nn={counts[i][j]}"
            # The colour map's ends are dark: white text there, dark text on the light middle and grey.
            dark = not np.isnan(m[i, j]) and (m[i, j] < 0.2 or m[i, j] > 0.85)
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "#1d2733")
    ax.set_xticks(np.arange(len(data_sites)), list(data_sites), rotation=20 if len(data_sites) > 5 else 0)
    ax.set_yticks(np.arange(len(models)), list(models))
    ax.set_xlabel("test data of site")
    ax.set_ylabel("model")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return figure_to_data_uri(fig)


def metric_vs_labels(arms: Mapping[str, Sequence[tuple[float, float, float | None, float | None]]], *,
                     title: str, ylabel: str, chance: float | None = None) -> str:
    """A metric against labelled scans per class (log2 axis), one line per experiment arm, with 95% intervals.

    Args:
        arms: arm name -> ``[(k, value, low, high), ...]``; ``low``/``high`` None when the arm has no interval.
        title: the figure title.
        ylabel: label of the y axis.
        chance: a dashed horizontal line at the chance level, if given.

    Returns:
        A ``data:image/png;base64,...`` URI.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ks: set[float] = set()
    for index, (name, points) in enumerate(arms.items()):
        pts = sorted(points)
        if not pts:
            continue
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        lo = np.array([p[1] - p[2] if p[2] is not None else 0.0 for p in pts])
        hi = np.array([p[3] - p[1] if p[3] is not None else 0.0 for p in pts])
        # Arms share the k values: a small horizontal offset keeps their intervals apart.
        shift = 2 ** ((index - (len(arms) - 1) / 2) * 0.03)
        ax.errorbar(x * shift, y, yerr=np.vstack([np.clip(lo, 0, None), np.clip(hi, 0, None)]), marker="o",
                    ms=4, capsize=3, lw=1.4, color=_site_colour(index), label=name)
        ks.update(x.tolist())
    if chance is not None:
        ax.axhline(chance, ls="--", lw=1, color="#7f8c8d", label="chance")
    if ks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ks), [f"{k:g}" for k in sorted(ks)])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(ks) / 1.3, max(ks) * 1.3)
    ax.set_xlabel("labelled scans per class per site (k)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # Below the axes: inside, the legend would cover intervals wherever the arms happen to lie.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
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
