"""Render the end-of-run ``report.html``: one self-contained page (inline CSS, PNG plots as data URIs).

The page is what a consortium reads after a run: loss curves per phase and site, MAE reconstructions, the
final classifier's confusion matrix and metrics per site and pooled, participation and bytes per round,
privacy spent per site, the configuration, and a red flag when the MAE did not beat the trivial "average
patch" predictor. It is written from the run directory alone (see :mod:`server.report.data`), so it can be
rendered again later with ``lungmae report RUN_DIR``.

Privacy: the page holds only what the server already has: aggregate metrics and counts per site. The
reconstructions are computed here, at the server, on a built-in synthetic phantom with the final MAE
checkpoint; no hospital scan is ever involved. No file path appears on the page (configuration values that
are paths are withheld), so it may be shared.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lungmae_core.atomic import atomic_write_text
from server.report import plots
from server.report.cross_site import cross_site_section, global_per_site_table
from server.report.data import (
    FINAL_METRICS,
    MAE_METRICS,
    PARTICIPATION_KEYS,
    FinalResults,
    Reconstruction,
    RoundRecord,
    RunDirectoryError,
    RunRecord,
    SiteResult,
    load_run,
    norm_key,
    series,
)
from server.report.experiment import EXPERIMENT_NAME, experiment_section

__all__ = ["render_report", "build_html", "REPORT_NAME"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
_METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "weighted_f1": "weighted F1",
    "roc_auc": "ROC AUC",
    "num_examples": "scans",
    "l1_masked": "MAE L1 (masked)",
    "baseline_l1_masked": "average-patch L1 (masked)",
    "l1_masked_lung": "MAE L1 (masked, lung)",
    "baseline_l1_masked_lung": "average-patch L1 (masked, lung)",
}
_MAX_LIST = 8  # longer lists in the configuration (e.g. the step plan) are shortened
# Configuration keys whose values are file system locations; never shown on the page.
_PATH_KEY_WORDS = ("dir", "path", "file", "cert", "key", "ledger", "home", "audit_log", "cache", "input")

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f6f8;
  color:#1d2733}
main{max-width:1060px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.7em;margin:0 0 4px}
h2{font-size:1.25em;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #dfe6ec}
h3{font-size:1.05em;margin:18px 0 8px} p.lead{color:#55636f;margin:0 0 16px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:.92em}
th,td{padding:4px 10px;border:1px solid #d5dde3;text-align:right}
th{background:#eef2f5} td.name,th.name{text-align:left} tr.pooled td{font-weight:600;background:#f7fafc}
img{max-width:100%;height:auto;display:block;margin:6px 0 12px} .figs{display:flex;flex-wrap:wrap;gap:8px}
.figs figure{flex:1 1 48%;margin:0;min-width:320px} .figs h3{margin:8px 0 2px} .note{color:#55636f;font-size:.92em}
.flag{border-left:6px solid #c0392b;background:#fdecea;padding:10px 14px;margin:10px 0}
.ok{border-left:6px solid #27ae60;background:#eafaf1;padding:10px 14px;margin:10px 0}
.warn{border-left:6px solid #e67e22;background:#fef5e7;padding:10px 14px;margin:10px 0}
.privacy{border-left:6px solid #2980b9;background:#ebf5fb;padding:10px 14px;margin:10px 0}
nav a{margin-right:12px;font-size:.92em} code{background:#eef2f5;padding:1px 4px;border-radius:3px}
.problem{display:inline-block;max-width:380px;text-align:left;font-size:.88em}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:0 20px;align-items:start}
.cols table{font-size:.82em;width:100%} .cols td{overflow-wrap:anywhere}
.ci{color:#55636f;font-size:.88em;white-space:nowrap} tr.diag td{background:#f7fafc}
"""


# ----------------------------------------------------------------------------------------------------------
# small HTML helpers (every value that comes from a file is escaped)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    """A metric with a fixed number of decimals; an en dash when absent."""
    if value is None:
        return "&ndash;"
    if not math.isfinite(value):
        return _e(value)
    return f"{value:.{digits}f}"


def _int(value: float | None) -> str:
    """A count (sites, scans, bytes) with thousands separators; an en dash when absent."""
    if value is None or not math.isfinite(value):
        return "&ndash;"
    return f"{int(round(value)):,}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *, row_classes: Sequence[str] | None = None,
           table_id: str = "", text_cols: int = 1, left_cols: Sequence[int] = ()) -> str:
    """An HTML table; ``header`` and cells are already-escaped HTML.

    The first ``text_cols`` columns (and the columns in ``left_cols``) hold text and are left-aligned; the
    others hold numbers.
    """
    def cell(tag: str, i: int, content: str) -> str:
        left = i < text_cols or i in left_cols
        return f'<{tag} class="name">{content}</{tag}>' if left else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        body.append(f"<tr{cls}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _figure(title: str, content: str) -> str:
    """One titled cell of a ``.figs`` row (two per row on a wide page)."""
    return f"<figure><h3>{_e(title)}</h3>{content}</figure>"


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{_e(title)}</h2>{body}</section>'


def _absent(text: str) -> str:
    """The sentence a section shows instead of its content when the run did not produce it."""
    return f'<p class="note absent">{_e(text)}</p>'


# ----------------------------------------------------------------------------------------------------------
# sections


_PATH_RE = re.compile(r"(?<![\w.:])(?:~|[A-Za-z]:)?[/\\][\w.\-~/\\]+")


def _scrub_paths(text: str) -> str:
    """``text`` with anything that looks like a file path replaced, for notes the server wrote freely."""
    return _PATH_RE.sub("(path withheld)", text)


# Absolute (/x, ~/x, C:\\x) or explicitly relative (./x, ../x) paths, or a/b/c without spaces with a letter in it
# ("pretrain 1/2" and "1/2" are not paths).
_PATH_VALUE_RE = re.compile(r"^(?:~|\.{1,2}[/\\]|/|[A-Za-z]:[/\\])"
                            r"|^(?=[^\s]*[A-Za-z])[\w.\-]+(?:[/\\][\w.\-]+)+[/\\]?$")


def _looks_like_path(key: str, value: Any) -> bool:
    """Whether a configuration value names a file or directory (by its key's words or by its shape)."""
    if not isinstance(value, str) or value == "":
        return False
    key_words = norm_key(key).split("_")
    if any(word in key_words or norm_key(key).endswith(word) for word in _PATH_KEY_WORDS):
        return True
    return _PATH_VALUE_RE.search(value) is not None


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.extend(_flatten(value, name))
        elif isinstance(value, Mapping):
            out.append((name, "(none)"))
        else:
            out.append((name, value))
    return out


def _config_section(run: RunRecord) -> str:
    if not run.run_config:
        return _section("config", "Configuration", _absent(
            "run_config.json is absent, so the configuration of this run cannot be shown."))
    rows = []
    for name, value in _flatten(run.run_config):
        last = name.rsplit(".", 1)[-1]
        if _looks_like_path(last, value) or (isinstance(value, list) and any(_looks_like_path(last, v) for v in value)):
            shown = "<em>(a path: withheld from the report)</em>"
        elif isinstance(value, (list, tuple)) and len(value) > _MAX_LIST:
            shown = _e(", ".join(str(v) for v in value[:3]) + f", ..., {value[-1]} ({len(value)} in all)")
        elif isinstance(value, (list, tuple)):
            shown = _e(", ".join(str(v) for v in value))
        else:
            shown = _e(value)
        rows.append((f"<code>{_e(name)}</code>", shown))
    half = (len(rows) + 1) // 2 if len(rows) > 16 else len(rows)  # long configurations: two columns
    tables = [_table(("key", "value"), part, table_id=ident, left_cols=(1,))
              for part, ident in ((rows[:half], "config-table"), (rows[half:], "config-table-2")) if part]
    body = ('<p class="note">The run configuration as the server recorded it in <code>run_config.json</code>; '
            "values that name files or directories are withheld.</p>"
            + '<div class="cols">' + "".join(f"<div>{t}</div>" for t in tables) + "</div>")
    return _section("config", "Configuration", body)


def _status_lines(run: RunRecord) -> list[str]:
    lines = []
    rounds = run.rounds
    if rounds:
        per_phase = {p: sum(1 for r in rounds if r.phase == p) for p in run.phases}
        lines.append(f"{len(rounds)} rounds recorded: " + ", ".join(f"{n} {_e(p)}" for p, n in per_phase.items()))
    last = run.state.get("server_round", run.state.get("round"))
    phase = run.state.get("phase")
    if last is not None:
        lines.append(f"last complete round: {_e(last)}" + (f" ({_e(phase)})" if phase else ""))
    if run.sites:
        lines.append(f"{len(run.sites)} sites: " + ", ".join(_e(s) for s in run.sites))
    lines.append("final evaluation: " + ("present" if run.final is not None and run.final.sites
                                          else "absent (the run did not reach it or no site could serve it)"))
    status = run.summary.get("status")
    if isinstance(status, str):
        lines.insert(0, f"status: <strong>{_e(status)}</strong>")
    return lines


def _sites_table(run: RunRecord) -> str:
    """What each site said about itself (counts of scans, DP, GPU) and how many rounds it trained in."""
    if not run.site_info:
        return ""
    cols = ("num_unlabelled", "num_labelled_train", "num_labelled_val", "num_labelled_test")

    def yes_no(value: Any) -> str:
        return "yes" if value else "no"

    rows = [(_e(site), *(_int(_number_or_none(info.get(c))) for c in cols), yes_no(info.get("dp_enabled")),
             yes_no(info.get("has_gpu")), str(sum(1 for r in run.rounds if site in r.train_sites)))
            for site, info in sorted(run.site_info.items())]
    header = ("site", "unlabelled scans", "labelled: train", "val", "test", "DP-SGD", "GPU", "rounds trained")
    errors = [str(info.get("error") or "") for _, info in sorted(run.site_info.items())]
    if any(errors):  # a site that could not serve (e.g. no cache) says why; paths are withheld
        header += ("problem",)
        rows = [(*row, f'<span class="problem">{_e(_scrub_paths(err))}</span>')
                for row, err in zip(rows, errors, strict=True)]
    return ("<h3>sites</h3>" + _table(header, rows, table_id="sites-table")
            + '<p class="note">Counts each site reported when asked what it can serve; sites without labels take '
              "part in pretraining only.</p>")


def _loss_key(rounds: Sequence[RoundRecord], phase: str) -> str | None:
    for key in ("loss",):
        if any(key in m for r in rounds if r.phase == phase for m in [r.train_aggregated, *r.train_sites.values()]):
            return key
    return None


def _loss_section(run: RunRecord) -> str:
    parts = []
    titles = {"pretrain": "pretrain: MAE, lung-weighted L1 loss", "finetune": "finetune: classifier, cross-entropy"}
    for phase in ("pretrain", "finetune"):
        key = _loss_key(run.rounds, phase)
        if key is None:
            parts.append(_figure(f"{phase}: training loss", _absent(
                f"No {phase} round recorded a training loss, so there is no {phase} curve.")))
            continue
        per_site, aggregated = series(run.rounds, phase, key)
        uri = plots.loss_curves(per_site, aggregated, title=titles[phase], ylabel="training loss",
                                site_order=run.sites)
        parts.append(_figure(f"{phase}: training loss", _img(uri, f"{phase} training loss per site and aggregated")))
    per_site, aggregated = series(run.rounds, "pretrain", "l1_masked", part="evaluate")
    _, baseline = series(run.rounds, "pretrain", "baseline_l1_masked", part="evaluate")
    if aggregated:
        uri = plots.loss_curves(per_site, aggregated, title="pretrain validation: masked L1 (dashed: average patch)",
                                ylabel="L1 on masked patches", site_order=run.sites, reference=baseline)
        parts.append(_figure("pretrain: validation", _img(uri, "masked L1 of the MAE against the average-patch "
                                                             "baseline per round")))
    per_site, aggregated = series(run.rounds, "finetune", "balanced_accuracy", part="evaluate")
    if aggregated:
        uri = plots.loss_curves(per_site, aggregated, title="finetune validation: balanced accuracy",
                                ylabel="balanced accuracy", site_order=run.sites)
        parts.append(_figure("finetune: validation", _img(uri, "validation balanced accuracy per round")))
    body = ('<p class="note">Thin lines: each site\'s reply; thick black line: the aggregate the server '
            "computed (weighted by the number of scans).</p>" + '<div class="figs">' + "".join(parts) + "</div>")
    return _section("loss", "Loss curves", body)


def _last_mae_evaluation(run: RunRecord) -> tuple[dict[str, float], dict[str, dict[str, float]]] | None:
    """The MAE metrics of the last pretrain round that was evaluated: (aggregated, per site)."""
    for r in reversed(run.rounds):
        if r.phase == "pretrain" and "l1_masked" in r.evaluate_aggregated:
            return r.evaluate_aggregated, r.evaluate_sites
    if run.final is not None and "l1_masked" in run.final.mae:
        return run.final.mae, {}
    return None


def _beats(metrics: Mapping[str, float], which: str = "") -> bool | None:
    """Whether the MAE's masked L1 is below the average-patch baseline's (``which``: "" or "_lung")."""
    mae, base = metrics.get(f"l1_masked{which}"), metrics.get(f"baseline_l1_masked{which}")
    if mae is None or base is None or not (math.isfinite(mae) and math.isfinite(base)):
        return None
    if base == 0.0:
        # evaluate_mae gives 0 for both when no masked patch of that kind existed, and its average patch is
        # the mean over the evaluated scans themselves, so a single scan makes the baseline exactly 0.
        return None
    return mae < base


def _mae_quality(run: RunRecord, recon: Reconstruction | None) -> tuple[str, str]:
    """(flag HTML for the top of the page, table section) comparing the MAE with the average patch."""
    found = _last_mae_evaluation(run)
    if found is None:
        text = ("No pretrain evaluation (evaluate_mae: l1_masked and baseline_l1_masked) was recorded, so "
                "whether the MAE beat the average-patch predictor is unknown.")
        return f'<div class="warn" id="mae-flag">{_e(text)}</div>', _absent(text)
    aggregated, sites = found
    header = ("site", "scans", *(_METRIC_LABELS[k] for k in MAE_METRICS), "beats average patch")
    rows, classes = [], []

    def row(name: str, m: Mapping[str, float], cls: str = "") -> None:
        verdict = _beats(m)
        lung = _beats(m, "_lung")
        text = {True: "yes", False: "<strong>NO</strong>", None: "&ndash;"}[verdict]
        if lung is not None:
            text += " / lung: " + {True: "yes", False: "<strong>NO</strong>"}[lung]
        rows.append((name, _int(m.get("num_examples")), *(_fmt(m.get(k)) for k in MAE_METRICS), text))
        classes.append(cls)

    for site in sorted(sites):
        row(_e(site), sites[site])
    row("all sites (aggregated)", aggregated, "pooled")
    if recon is not None and "l1_masked" in recon.metrics:
        row("synthetic phantom (at the server)", recon.metrics)
    overall, lung = _beats(aggregated), _beats(aggregated, "_lung")
    if overall is False or lung is False:
        failed = [name for name, v in (("on all masked patches", overall), ("on lung patches", lung)) if v is False]
        flag = ('<div class="flag" id="mae-flag"><strong>The MAE did not beat the trivial "average patch" '
                f"predictor</strong> {' and '.join(failed)}: its reconstruction L1 "
                f"{_fmt(aggregated.get('l1_masked'))} (lung {_fmt(aggregated.get('l1_masked_lung'))}) is not "
                f"below the baseline's {_fmt(aggregated.get('baseline_l1_masked'))} (lung "
                f"{_fmt(aggregated.get('baseline_l1_masked_lung'))}). The pretrained encoder has probably not "
                "learned anatomy; consider more pretrain rounds or a larger learning rate.</div>")
    elif overall is None:
        flag = ('<div class="warn" id="mae-flag">No verdict on the MAE against the "average patch" predictor: its '
                "baseline is missing or 0 (the average patch is the mean over the other evaluated scans, so a "
                "site that evaluates a single scan has no other and gets a perfect baseline). Give the sites more "
                "validation scans."
                "</div>")
    else:
        flag = ('<div class="ok" id="mae-flag">The MAE beat the trivial "average patch" predictor: masked L1 '
                f"{_fmt(aggregated.get('l1_masked'))} against {_fmt(aggregated.get('baseline_l1_masked'))} "
                f"(lung {_fmt(aggregated.get('l1_masked_lung'))} against "
                f"{_fmt(aggregated.get('baseline_l1_masked_lung'))}).</div>")
    body = ('<p class="note">evaluate_mae at each site on its validation scans after the last pretrain round: the '
            "MAE's mean L1 on masked patches (all, and lung patches only) next to the trivial predictor that fills "
            "every masked patch with the average patch at that position over the evaluated scans (the "
            "\"mean anatomy\"), on the same masks. Lower is better.</p>" + _table(header, rows, row_classes=classes,
                                                                        table_id="mae-table"))
    return flag, body


def _reconstruction_section(recon: Reconstruction | None, reason: str, quality: str) -> str:
    privacy = ('<div class="privacy">Reconstructions are computed at the server on a built-in synthetic phantom '
               "with the final MAE checkpoint of this run. No hospital scan leaves a site: the sites send model "
               "weights and aggregate metrics only.</div>")
    if recon is None:
        body = privacy + _absent(reason)
    else:
        body = (privacy + f'<p class="note">{_e(recon.description)}</p>'
                + _img(recon.figure_uri, "MAE reconstruction of a synthetic phantom: input, masked input and "
                                         "reconstruction in three orthogonal slices"))
    return _section("reconstructions", "MAE reconstructions", body + "<h3>MAE against the average patch</h3>"
                    + quality)


def _metric_cell(result: SiteResult, key: str) -> str:
    if result.metrics.get(key) is None:  # undefined (null in metrics.json): never shown as 0 or 1
        present = result.metrics.get("classes_present")
        why = (f"undefined: only {int(present)} classes are in this split" if present is not None
               else "undefined or not released")
        return f'<span title="{_e(why)}">n/a</span>'
    return _fmt(result.metrics.get(key))


def _pooled_confusion(final: FinalResults) -> list[list[float]] | None:
    if final.pooled is not None and final.pooled.confusion_matrix is not None:
        return final.pooled.confusion_matrix
    matrices = [s.confusion_matrix for s in final.sites.values() if s.confusion_matrix is not None]
    if not matrices or len({len(m) for m in matrices}) != 1:
        return None
    n = len(matrices[0])
    return [[sum(m[i][j] for m in matrices) for j in range(n)] for i in range(n)]


def _class_names(final: FinalResults, n: int) -> list[str]:
    if len(final.class_names) == n:
        return list(final.class_names)
    try:
        from lungmae_core.data import CLASS_NAMES
    except ImportError:  # the data module is optional for the report
        CLASS_NAMES = ()
    if len(CLASS_NAMES) == n:
        return list(CLASS_NAMES)
    return [f"class {i}" for i in range(n)]


def _final_section(run: RunRecord) -> str:
    final = run.final
    if final is None or (not final.sites and final.pooled is None):
        why = f" The server noted: {_scrub_paths(final.note)}" if final is not None and final.note else ""
        return _section("final-metrics", "Final classifier", _absent(
            "metrics.json has no \"final\" results (the run did not reach the final evaluation, or no site had "
            "a test split), so there is no metrics table and no confusion matrix." + why))
    header = ("site", *(_METRIC_LABELS[k] for k in FINAL_METRICS), "test scans")
    rows, classes = [], []
    for site in sorted(final.sites):
        result = final.sites[site]
        rows.append((_e(site), *(_metric_cell(result, k) for k in FINAL_METRICS),
                     _int(result.metrics.get("num_examples"))))
        classes.append("")
    if final.pooled is not None:
        rows.append(("pooled (all test scans)", *(_metric_cell(final.pooled, k) for k in FINAL_METRICS),
                     _int(final.pooled.metrics.get("num_examples"))))
        classes.append("pooled")
    parts = ["<h3>global model per site</h3>"
             '<p class="note">The final global classifier on each site\'s held-out test split; "pooled" scores '
             "all test scans together (computed from the sites' aggregate counts). Each site's own fine-tuned "
             "model on the other sites' data is the cross-site matrix below.</p>",
             _table(header, rows, row_classes=classes, table_id="final-table"),
             global_per_site_table(run.summary, {s: r.metrics for s, r in final.sites.items()})]
    matrix = _pooled_confusion(final)
    if matrix is None:
        parts.append(_absent("No site sent a confusion matrix, so none is shown."))
    else:
        names = _class_names(final, len(matrix))
        uri = plots.confusion_matrix_figure(matrix, names, title="final model, all test scans")
        parts.append("<h3>confusion matrix</h3>" + _img(uri, "confusion matrix of the final model"))
    return _section("final-metrics", "Final classifier", "".join(parts))


def _round_note(r: RoundRecord) -> str:
    """The note column: skipped rounds, then which site was rejected or failed and why (paths withheld)."""
    lines = []
    if r.skipped or r.note:
        lines.append(("skipped" + (f": {r.note}" if r.note else "")) if r.skipped else r.note)
    lines.extend(r.problems)
    return "<br>".join(f'<span class="problem">{_e(_scrub_paths(line))}</span>' for line in lines)


def _participation_section(run: RunRecord) -> str:
    rounds = [r for r in run.rounds if any(r.participation.get(k) is not None for k in PARTICIPATION_KEYS)]
    if not rounds:
        return _section("participation", "Participation per round",
                        _absent("The rounds recorded no participation counts."))
    keys = [k for k in PARTICIPATION_KEYS if any(r.participation.get(k) is not None for r in rounds)]
    counts = {k: [r.participation.get(k) or 0 for r in rounds] for k in keys}
    uri = plots.participation_chart([r.server_round for r in rounds], counts)
    rows = [(str(r.server_round), _e(r.phase), *(_int(r.participation.get(k)) for k in keys), _round_note(r))
            for r in rounds]
    body = (_img(uri, "sites sampled, replied, failed and rejected per round")
            + _table(("round", "phase", *keys, "note"), rows, table_id="participation-table", text_cols=2,
                     left_cols=(len(keys) + 2,))
            + '<p class="note">sampled: sites asked to train; replied: sites whose update was accepted and '
              "aggregated; failed: no reply in time or an error reply (training or evaluation); rejected: the "
              "reply failed the server's checks (replay, identity, size, contract, declared count, privacy, names, "
              "shapes, dtypes, finite values, norm bound) and was not aggregated.</p>")
    return _section("participation", "Participation per round", body)


def _bytes_section(run: RunRecord) -> str:
    rounds = [r for r in run.rounds if r.bytes_up is not None or r.bytes_down is not None]
    if not rounds:
        return _section("bytes", "Bytes per round", _absent("The rounds recorded no byte counts."))
    up = [r.bytes_up or 0.0 for r in rounds]
    down = [r.bytes_down or 0.0 for r in rounds]
    uri = plots.bytes_chart([r.server_round for r in rounds], up, down)
    rows = [(str(r.server_round), _e(r.phase), _int(r.bytes_down), _int(r.bytes_up)) for r in rounds]
    rows.append(("total", "", _int(sum(down)), _int(sum(up))))
    body = (_img(uri, "bytes sent down and up per round")
            + _table(("round", "phase", "down (bytes)", "up (bytes)"), rows,
                     row_classes=[""] * len(rounds) + ["pooled"], table_id="bytes-table", text_cols=2))
    return _section("bytes", "Bytes per round", body)


def _privacy_section(run: RunRecord) -> str:
    # Each reply's epsilon is the site's running total at its own delta (CONTRACTS.md), so the newest value
    # is what the site has spent; a site sends it with evaluation replies too, so both parts are read.
    per_site: dict[str, dict[int, float]] = {}
    for phase in run.phases:
        for part in ("train", "evaluate"):
            site_series, _ = series(run.rounds, phase, "epsilon", part=part)
            for site, points in site_series.items():
                for server_round, value in points:
                    per_site.setdefault(site, {})[server_round] = max(value, per_site.get(site, {}).get(
                        server_round, 0.0))
    info = run.site_info
    used = {s: sorted(p.items()) for s, p in per_site.items() if any(v > 0 for v in p.values())}
    used_names = set(used) | {s for s, i in info.items() if i.get("dp_enabled")}
    central = [(r.server_round, r.train_aggregated["central_epsilon"], r.train_aggregated.get("central_clipped"))
               for r in run.rounds if "central_epsilon" in r.train_aggregated]
    if not used_names and not central:
        return _section("privacy", "Differential privacy", _absent(
            "Differential privacy was not used in this run: every site reported epsilon 0 (no DP-SGD) and the "
            "server added no noise (no central DP)." if per_site else
            "No site reported an epsilon, so differential privacy was not used."))
    parts = []
    if used_names:
        rows = []
        for site in sorted(used_names):
            spent = used[site][-1][1] if site in used else 0.0
            budget = _number_or_none(info.get(site, {}).get("epsilon_budget"))
            share = f"{100 * spent / budget:.0f}%" if budget else "&ndash;"
            trained = sum(1 for r in run.rounds if site in r.train_sites)
            rows.append((_e(site), _fmt(spent, 3), _fmt(budget, 3) if budget else "&ndash;", share, str(trained)))
        parts.append('<h3>at the sites (DP-SGD)</h3><p class="note">Each site reports the total epsilon it has '
                     "spent so far (RDP accounting at its own delta), taken from the privacy ledger it keeps for "
                     "itself; a site refuses to train once its budget would be exceeded.</p>")
        if used:
            parts.append(_img(plots.epsilon_chart(dict(used), site_order=run.sites),
                              "epsilon spent per site over rounds"))
        parts.append(_table(("site", "epsilon spent", "budget", "of budget", "rounds trained"), rows,
                            table_id="privacy-table"))
    else:
        parts.append(_absent("No site trained with DP-SGD (every site reported epsilon 0)."))
    if central:
        rows = [(str(rnd), _fmt(eps, 3), _int(clipped)) for rnd, eps, clipped in central]
        parts.append('<h3>at the server (central DP)</h3><p class="note">The server clipped each site\'s update '
                     "and added Gaussian noise to their mean: site-level DP of every aggregate, epsilon counted "
                     "over all rounds so far at the federation's central-dp-delta. It is separate from the sites' "
                     "own budgets.</p>"
                     + _table(("round", "central epsilon (total)", "updates clipped"), rows,
                              table_id="central-dp-table"))
    return _section("privacy", "Differential privacy", "".join(parts))


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# the page


def build_html(run: RunRecord, recon: Reconstruction | None, recon_reason: str = "", *,
               run_dir: Path | None = None) -> str:
    """The whole page as one string: sections in reading order, every figure inline.

    Args:
        run: the run directory, read by :func:`server.report.data.load_run`.
        recon: the phantom reconstruction, or ``None`` with ``recon_reason`` saying why there is none.
        recon_reason: the sentence shown instead of the reconstruction figure.
        run_dir: where the run lives; an ``experiment.json`` there adds the experiment section.
    """
    flag, quality = _mae_quality(run, recon)
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in run.warnings)
    skipped = [r.server_round for r in run.rounds if r.skipped]
    if skipped:
        rounds = _e(", ".join(map(str, skipped)))
        warnings += f'<div class="warn">Rounds skipped (too few valid updates; the model was kept): {rounds}.</div>'
    experiment = experiment_section(run_dir) if run_dir is not None else ""
    sections = [
        _section("summary", "Summary", "<ul>" + "".join(f"<li>{line}</li>" for line in _status_lines(run))
                 + "</ul>" + flag + warnings + _sites_table(run)),
        _loss_section(run),
        _reconstruction_section(recon, recon_reason, quality),
        _final_section(run),
        cross_site_section(run.summary),
        _participation_section(run),
        _bytes_section(run),
        _privacy_section(run),
        _config_section(run),
    ]
    nav = " ".join(f'<a href="#{i}">{t}</a>' for i, t in (
        ("summary", "summary"), ("loss", "loss"), ("reconstructions", "reconstructions"),
        ("final-metrics", "final metrics"), ("cross-site", "cross-site"), ("participation", "participation"),
        ("bytes", "bytes"), ("privacy", "privacy"), ("config", "configuration")))
    if experiment:
        sections.insert(1, experiment)
        nav = nav.replace('<a href="#loss">', '<a href="#experiment">experiment</a> <a href="#loss">', 1)
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    config_hash = run.run_config.get("config_hash") or run.summary.get("config_hash")
    subtitle = f"configuration {_e(str(config_hash)[:12])} &middot; " if config_hash else ""
    version = run.run_config.get("code_version")
    subtitle += f"{_e(version)} &middot; " if isinstance(version, str) else ""
    return _page(f'<p class="lead">{subtitle}federated MAE pretraining and ILD fine-tuning &middot; rendered {when}</p>'
                 f"<nav>{nav}</nav>" + "".join(sections))


def _page(body: str) -> str:
    """The HTML document around ``body`` (inline CSS only: no script, nothing fetched)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>LungMAE-FL run report</title><style>{_CSS}</style></head><body><main>"
            "<h1>LungMAE-FL run report</h1>" + body + "</main></body></html>\n")




def render_report(run_dir: str | Path, out: str | Path | None = None, *, reconstructions: bool = True) -> Path:
    """Render ``report.html`` for the run in ``run_dir``; the file is replaced atomically.

    Args:
        run_dir: the run directory the server wrote (``run_config.json``, ``metrics.jsonl``, ...).
        out: where to write the page. Defaults to ``run_dir / "report.html"``.
        reconstructions: compute the MAE reconstructions of a synthetic phantom with the last pretrain
            checkpoint (a few seconds for the ``tiny`` model on CPU). Defaults to True.

    Returns:
        The path of the written page.

    Raises:
        RunDirectoryError: ``run_dir`` is not a readable run directory (see :func:`load_run`).

    Examples:
        >>> render_report("runs/simulate/run-20261128-021500")  # doctest: +SKIP
        PosixPath('runs/simulate/run-20261128-021500/report.html')
    """
    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else run_dir / REPORT_NAME
    try:
        run = load_run(run_dir)
    except RunDirectoryError:
        if not (run_dir / EXPERIMENT_NAME).is_file():
            raise
        # An experiment's output folder without a federation run of its own: the page shows the experiment.
        when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, _page(f'<p class="lead">experiment results &middot; rendered {when}</p>'
                                          + experiment_section(run_dir)))
        logger.info("Report written to %s", out_path)
        return out_path
    recon: Reconstruction | None = None
    reason = "Reconstructions were not requested for this rendering."
    if reconstructions:
        from server.report.recon import phantom_reconstruction  # torch and the model: only when needed

        recon, reason = phantom_reconstruction(run)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, build_html(run, recon, reason, run_dir=run_dir))
    logger.info("Report written to %s", out_path)
    return out_path
