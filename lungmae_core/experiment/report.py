"""The experiment's outputs: ``experiment.json``, ``results.md`` (table), ``accuracy_vs_k.png``, ``reconstruction.png``.

Written after every seed, so an interrupted run leaves the seeds it finished (``seeds_done`` says how many).
Per-scan test probabilities go to ``predictions.npz`` (synthetic or the researcher's own data: they stay
with whoever ran the experiment).
"""

from __future__ import annotations

import io
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from lungmae_core.atomic import atomic_path, atomic_write_json, atomic_write_text
from lungmae_core.experiment.data import ExperimentData
from lungmae_core.experiment.runner import ENDPOINT, profile_summary
from lungmae_core.experiment.stats import paired_difference, summarise

__all__ = ["write_outputs"]

logger = logging.getLogger(__name__)


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def summaries(results: dict[str, Any], data: ExperimentData) -> dict[str, Any]:
    """Per arm and k: seed-mean balanced accuracy and ROC AUC with bootstrap intervals; the endpoint."""
    n_cls = len(data.class_names)
    y = data.test_labels
    heldout = np.array([s.startswith("heldout") for s in data.test_scanner])
    n_boot = results["profile"].n_boot
    arms: dict[str, Any] = {}
    for arm, by_k in results["predictions"].items():
        arms[arm] = {}
        for k, probs in sorted(by_k.items()):
            entry = summarise(y, probs, n_cls, n_boot=n_boot, seed=k)
            if heldout.any():
                held = summarise(y, probs, n_cls, n_boot=max(n_boot // 4, 50), seed=k, subset=heldout)
                entry["heldout_scanner"] = {key: held[key] for key in ("balanced_accuracy", "balanced_accuracy_ci",
                                                                       "roc_auc", "test_patients")}
            arms[arm][str(k)] = entry
    endpoint: dict[str, Any] = {**ENDPOINT}
    preds = results["predictions"]
    k = ENDPOINT["k"]
    def paired(a: list[np.ndarray], b: list[np.ndarray], boots: int) -> dict[str, Any]:
        # Only the seeds both arms have (a partial run has the endpoint's arms for more seeds than the rest).
        n = min(len(a), len(b))
        return paired_difference(y, a[:n], b[:n], n_cls, n_boot=boots)

    if k in preds.get(ENDPOINT["arm"], {}) and k in preds.get(ENDPOINT["versus"], {}):
        endpoint.update(paired(preds[ENDPOINT["arm"]][k], preds[ENDPOINT["versus"]][k], 2 * n_boot))
    comparisons = {}
    for other in ("central-mae-ft", "fed-scratch-compute-matched", "fed-mae-lp"):
        if k in preds.get(other, {}) and k in preds.get(ENDPOINT["arm"], {}):
            comparisons[f"{ENDPOINT['arm']} - {other}"] = paired(preds[ENDPOINT["arm"]][k], preds[other][k],
                                                                n_boot)
    return {"arms": arms, "endpoint": endpoint, "comparisons_at_k8": comparisons}


def _fmt(entry: dict[str, Any], key: str = "balanced_accuracy") -> str:
    lo, hi = entry[f"{key}_ci"]
    return f"{entry[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def results_table(summary: dict[str, Any], ks: list[int], key: str = "balanced_accuracy") -> str:
    """Markdown: one row per arm, one column per k, ``mean [95% CI]``."""
    head = "| arm | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks) + "\n"
    rows = []
    for arm, by_k in summary["arms"].items():
        cells = [_fmt(by_k[str(k)], key) if str(k) in by_k else "-" for k in ks]
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _markdown(results: dict[str, Any], summary: dict[str, Any], data: ExperimentData) -> str:
    p = results["profile"]
    ks = list(p.ks)
    ep = summary["endpoint"]
    lines = [f"# Experiment results ({p.name} profile, {results['seeds_done']} seed(s), {data.source})", "",
             f"Primary endpoint: {ENDPOINT['statement']}.", ""]
    if "difference" in ep:
        lines.append(f"**Endpoint: {ep['difference']:+.3f} (95% CI {ep['ci'][0]:+.3f} to {ep['ci'][1]:+.3f}), "
                     f"{ep['test_patients']} test patients, {ep['seeds']} seed(s).**")
    heldout = sum(s.startswith("heldout") for s in data.test_scanner)
    lines += ["", f"Test set: {len(data.test_labels)} patients ({heldout}"
              " from a scanner no site trains on). Sites: " + ", ".join(
                  f"{s.name} ({'labelled' if s.labelled else 'unlabelled'}, {len(s)} scans, {s.scanner})"
                  for s in data.sites) + ".", "",
              "## Balanced accuracy (seed mean, 95% bootstrap CI over test patients)", "",
              results_table(summary, ks), "## ROC AUC (macro one-vs-rest)", "",
              results_table(summary, ks, "roc_auc"), "## Paired differences at k=8", ""]
    for name, c in summary["comparisons_at_k8"].items():
        lines.append(f"- {name}: {c['difference']:+.3f} (95% CI {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f})")
    lines += ["", "## MAE reconstruction on the test set (masked lung patches, L1 in [0, 1] units)", "",
              "| seed | MAE | mask ratio | masked-lung L1 | average-patch L1 | steps | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in results["reconstruction"]:
        lines.append(f"| {r['seed']} | {r['mae']} | {r['mask_ratio']:g} | {r['l1_masked_lung']:.4f} | "
                     f"{r['baseline_l1_masked_lung']:.4f} | {r['steps']} | {r['seconds']:.0f} |")
    lines += ["", f"Wall time {results['seconds']:.0f} s; load average at write {_load()} on "
              f"{os.cpu_count()} CPU(s) ({platform.machine()})."]
    return "\n".join(lines) + "\n"


def _plot_accuracy(summary: dict[str, Any], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, by_k in summary["arms"].items():
        xs = [k for k in ks if str(k) in by_k]
        if len(xs) < 2 or arm.startswith("local-site") and arm != "local-site0":
            continue
        mean = np.array([by_k[str(k)]["balanced_accuracy"] for k in xs])
        ci = np.array([by_k[str(k)]["balanced_accuracy_ci"] for k in xs])
        ax.errorbar(xs, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], marker="o", capsize=3, label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("labelled scans per class per site (k)")
    ax.set_ylabel("balanced accuracy (test, 95% CI)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _plot_reconstruction(results: dict[str, Any], data: ExperimentData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    mae = results["maes"].get("fed")
    if mae is None:
        return
    cfg = mae.cfg
    picks = [int(np.flatnonzero(data.test_labels == c)[0]) for c in range(len(data.class_names))
             if (data.test_labels == c).any()]
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.5 * len(picks)), squeeze=False)
    gen = torch.Generator().manual_seed(0)
    mae.eval()
    for row, i in enumerate(picks):
        x = torch.from_numpy(np.asarray(data.test_images[i:i + 1], np.float32))
        with torch.no_grad():
            pred, mask = mae(x, generator=gen)
        target = mae.patchify(x)
        m = mask.unsqueeze(-1)
        masked = mae.unpatchify(target * (1 - m) + 0.5 * m)
        recon = mae.unpatchify(target * (1 - m) + pred.clamp(0, 1) * m)
        mid = cfg.img_size // 2
        for col, (title, vol) in enumerate((("original", x), ("visible (masked grey)", masked),
                                            ("visible + reconstruction", recon))):
            axes[row, col].imshow(vol[0, 0, :, mid, :].numpy()[::-1], cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
        axes[row, 0].text(0, -2, data.class_names[int(data.test_labels[i])], fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def write_outputs(results: dict[str, Any], data: ExperimentData, outdir: str | Path) -> dict[str, Any]:
    """Write every output file for the seeds done so far; returns the JSON payload."""
    outdir = Path(outdir)
    summary = summaries(results, data)
    payload = {"profile": profile_summary(results["profile"]), "seeds_done": results["seeds_done"],
               "source": data.source, "class_names": list(data.class_names),
               "test": {"patients": int(len(data.test_labels)),
                        "heldout_scanner_patients": int(sum(s.startswith("heldout") for s in data.test_scanner))},
               "sites": [{"name": s.name, "scanner": s.scanner, "labelled": s.labelled, "scans": len(s)}
                         for s in data.sites],
               **summary, "reconstruction": results["reconstruction"], "seconds": results["seconds"],
               "load_average": _load(), "cpus": os.cpu_count(),
               "federation": "in-process FedAvg over lungmae_core.train (not Flower's runtime)",
               "seeds": results["profile"].seeds, "chance": 1.0 / len(data.class_names),
               "plots": ["accuracy_vs_k.png", "reconstruction.png"]}
    atomic_write_json(outdir / "experiment.json", payload)
    atomic_write_text(outdir / "results.md", _markdown(results, summary, data))
    arrays = {f"{arm}/k{k}/seed{i + 1}": p for arm, by_k in results["predictions"].items()
              for k, probs in by_k.items() for i, p in enumerate(probs)}
    with atomic_path(outdir / "predictions.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, test_labels=data.test_labels, **arrays)
    try:
        _plot_accuracy(summary, list(results["profile"].ks), outdir / "accuracy_vs_k.png")
        _plot_reconstruction(results, data, outdir / "reconstruction.png")
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        logger.warning("plots skipped: %s", exc)
    return payload
