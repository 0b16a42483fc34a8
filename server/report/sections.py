"""The report's sections, one function each (configuration, sites, losses, MAE quality and reconstructions,
final results, participation, bytes, privacy); :mod:`server.report.render` puts them in reading order."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from server.report import plots
from server.report.cross_site import global_per_site_table
from server.report.data import (
    FINAL_METRICS,
    MAE_METRICS,
    PARTICIPATION_KEYS,
    FinalResults,
    Reconstruction,
    RoundRecord,
    RunRecord,
    SiteResult,
    series,
)
from server.report.markup import (
    _absent,
    _e,
    _figure,
    _flatten,
    _fmt,
    _img,
    _int,
    _looks_like_path,
    _scrub_paths,
    _section,
    _table,
)

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
    header: tuple[str, ...] = ("site", "unlabelled scans", "labelled: train", "val", "test", "DP-SGD", "GPU",
                               "rounds trained")
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
        rows: list[tuple[str, ...]] = []
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
