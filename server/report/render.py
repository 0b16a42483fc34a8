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
import logging
from pathlib import Path

from lungmae_core.atomic import atomic_write_text
from server.report.cross_site import cross_site_section
from server.report.data import Reconstruction, RunDirectoryError, RunRecord, load_run
from server.report.experiment import EXPERIMENT_NAME, experiment_section
from server.report.markup import _e, _section
from server.report.sections import (
    _bytes_section,
    _config_section,
    _final_section,
    _loss_section,
    _mae_quality,
    _participation_section,
    _privacy_section,
    _reconstruction_section,
    _sites_table,
    _status_lines,
)

__all__ = ["render_report", "build_html", "REPORT_NAME"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"

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
