"""The report's cross-site evaluation section: the models x data sites matrix as heat maps and a table.

Reads ``final.cross_site`` of ``metrics.json`` (format in :mod:`server.cross_site`). Rows are models (the
global classifier, then each site's locally fine-tuned copy that the site agreed to share), columns the sites
whose test split scored them. Counts below a data site's minimum are withheld at the source and shown as
"< min" here. The old ``{site: metrics}`` form (the global model scored at each site) is not a cross-site
matrix: :func:`global_per_site_table` labels it as what it is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from server.cross_site import CROSS_SITE_METRICS, GLOBAL_MODEL, is_cross_site_matrix, read_cross_site
from server.report import plots

__all__ = ["cross_site_section", "global_per_site_table"]

_LABELS = {"balanced_accuracy": "balanced accuracy", "roc_auc": "ROC AUC", "accuracy": "accuracy",
           "weighted_f1": "weighted F1"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    return "&ndash;" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _final_raw(summary: Mapping[str, Any]) -> Any:
    final = summary.get("final")
    return final.get("cross_site", final.get("cross-site")) if isinstance(final, Mapping) else None


def cross_site_section(summary: Mapping[str, Any]) -> str:
    """``<section id="cross-site">``: heat maps per metric and the full table; a sentence when absent."""
    head = '<section id="cross-site"><h2>Cross-site evaluation</h2>'
    matrix, why = read_cross_site(_final_raw(summary))
    if matrix is None:
        return (head + f'<p class="note absent">{_e(why)} Only the global model scored at each site is '
                "available (Final classifier, above).</p></section>")
    names = {m: ("global model" if m == GLOBAL_MODEL else f"{m} (local)") for m in matrix.models}
    rows_shown = [names[m] for m in matrix.models]
    metrics = [m for m in CROSS_SITE_METRICS if m in matrix.metrics] + sorted(
        m for m in matrix.metrics if m not in CROSS_SITE_METRICS)
    figures = []
    for metric in metrics:
        uri = plots.cross_site_heatmap(matrix.metrics[metric], rows_shown, matrix.data_sites,
                                       title=f"{_LABELS.get(metric, metric)}: model (rows) on test data (columns)",
                                       counts=matrix.num_examples, suppressed=matrix.suppressed)
        figures.append(f"<figure><h3>{_e(_LABELS.get(metric, metric))}</h3>"
                       f'<img src="{uri}" alt="cross-site {_e(_LABELS.get(metric, metric))} matrix"></figure>')
    header = "".join(f"<th>{_e(_LABELS.get(m, m))}</th>" for m in metrics)
    body = []
    for i, model in enumerate(matrix.models):
        for j, site in enumerate(matrix.data_sites):
            values = [matrix.metrics[m][i][j] for m in metrics]
            if all(v is None for v in values) and matrix.num_examples[i][j] is None and not matrix.suppressed[i][j]:
                continue  # not evaluated: the heat map shows it grey
            if matrix.suppressed[i][j]:
                n = f"&lt; {matrix.min_count.get(site, '?')}"
            else:
                n = "&ndash;" if matrix.num_examples[i][j] is None else f"{matrix.num_examples[i][j]:,}"
            cls = ' class="diag"' if model == site else ""
            body.append(f"<tr{cls}><td class=\"name\">{_e(names[model])}</td><td class=\"name\">{_e(site)}</td>"
                        + "".join(f"<td>{_fmt(v)}</td>" for v in values) + f"<td>{n}</td></tr>")
    table = (f'<table id="cross-site-matrix"><thead><tr><th class="name">model</th><th class="name">test data'
             f"</th>{header}<th>test scans</th></tr></thead><tbody>{''.join(body)}</tbody></table>")
    note = ('<p class="note">Each site scored every model it received on its own held-out test split. '
            'Rows: the final global classifier, and each site\'s local copy fine-tuned from the global encoder '
            "(only sites that agreed to share it). A row that stays high across columns generalises; a column "
            "that is low for every model is the outlier site. Counts below a site's minimum are withheld by "
            "that site (&lt; min); the metrics are pooled figures and stay.</p>")
    return (head + note + '<div class="figs">' + "".join(figures) + "</div>" + table + _notes(matrix.notes)
            + "</section>")


def _notes(notes: Mapping[str, Any]) -> str:
    """Why rows, columns or cells are empty (sites that do not share, dropped models, refused evaluations)."""
    items = []
    if isinstance(notes.get("skipped"), str):
        items.append(f"cross-site step not run: {_e(notes['skipped'])}")
    for key, label in (("not_shared", "no local model from {}"), ("models", "row {} (local) is empty")):
        block = notes.get(key)
        if isinstance(block, Mapping):
            items += [f"{_e(label.format(name))}: {_e(reason)}" for name, reason in sorted(block.items())]
    cells = notes.get("cells")
    for c in cells if isinstance(cells, list) else []:
        if isinstance(c, Mapping):
            items.append(f"{_e(c.get('model', '?'))} (local) on {_e(c.get('data_site', '?'))}'s test data not "
                         f"scored: {_e(c.get('reason', ''))}")
    if not items:
        return ""
    return '<ul class="note" id="cross-site-notes">' + "".join(f"<li>{x}</li>" for x in items) + "</ul>"


def global_per_site_table(summary: Mapping[str, Any], per_site: Mapping[str, Mapping[str, float]]) -> str:
    """The old ``final.cross_site`` form (global model per site), only when it says more than ``per_site``.

    Args:
        summary: ``metrics.json``.
        per_site: the final table's metrics per site; a ``cross_site`` entry repeating them adds nothing.
    """
    raw = _final_raw(summary)
    if not isinstance(raw, Mapping) or is_cross_site_matrix(raw):
        return ""
    entries = {str(s): m for s, m in raw.items() if isinstance(m, Mapping)}
    numbers = {s: {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for s, m in entries.items()}
    if all(s in per_site and all(per_site[s].get(k) == v for k, v in m.items()) for s, m in numbers.items()):
        return ""
    keys = [k for k in ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc")
            if any(k in m for m in numbers.values())]
    rows = "".join(f'<tr><td class="name">{_e(s)}</td>' + "".join(f"<td>{_fmt(numbers[s].get(k))}</td>"
                                                                  for k in keys) + "</tr>" for s in sorted(numbers))
    return ("<h3>global model per site (cross_site entry)</h3>"
            '<p class="note">The final global classifier scored on each site\'s test split, as the server recorded '
            "it under final.cross_site; this is not a cross-site matrix of local models.</p>"
            '<table id="cross-site-table"><thead><tr><th class="name">site</th>'
            + "".join(f"<th>{_e(_LABELS.get(k, k))}</th>" for k in keys)
            + f"</tr></thead><tbody>{rows}</tbody></table>")
