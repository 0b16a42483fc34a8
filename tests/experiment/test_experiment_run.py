"""`lungmae experiment --profile tiny` end to end: every arm, every output file, and the report's experiment
section rendering the experiment.json that run wrote (not a hand-written one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ARMS = {"fed-mae-ft", "fed-scratch", "fed-mae-lp", "random-init-lp", "local-site0", "local-site1", "central-mae-ft",
        "fed-scratch-compute-matched", "fed-mae-ft-mask0.75", "baseline-histogram", "baseline-zone-texture"}


@pytest.mark.slow
def test_tiny_profile_writes_every_arm_and_the_report_renders_its_json(tmp_path: Path) -> None:
    from lungmae_core.experiment.data import build_phantom_sites
    from lungmae_core.experiment.report import write_outputs
    from lungmae_core.experiment.runner import PROFILES, run_experiment
    from server.report.experiment import experiment_section, read_experiment

    profile = PROFILES["tiny"]
    data = build_phantom_sites(profile.plan, tmp_path / "phantoms", workers=1)
    out = tmp_path / "out"
    calls = []
    results = run_experiment(profile, data, out, device=torch.device("cpu"),
                             on_seed_done=lambda r: calls.append(sorted(r["predictions"])))
    payload = write_outputs(results, data, out)
    # The endpoint's pair is written before anything else runs.
    assert calls[0] == ["fed-mae-ft", "fed-scratch"]
    for name in ("experiment.json", "results.md", "accuracy_vs_k.png", "reconstruction.png", "predictions.npz"):
        assert (out / name).stat().st_size > 0, name
    written = json.loads((out / "experiment.json").read_text())
    assert set(written["arms"]) == ARMS
    for arm in ARMS - {"fed-scratch-compute-matched", "fed-mae-ft-mask0.75"}:
        assert set(written["arms"][arm]) == {"4", "8"}, arm
    ep = written["endpoint"]
    assert ep["k"] == 8 and ep["ci"][0] <= ep["difference"] <= ep["ci"][1] and ep["seeds"] == 1
    assert {r["mae"] for r in written["reconstruction"]} == {"federated", "centralized", "federated-mask0.75"}
    assert payload["seeds_done"] == 1

    experiment, why = read_experiment(out)
    assert why == "" and experiment is not None
    assert set(experiment.arms) == ARMS
    fed = {p.k: p for p in experiment.arms["fed-mae-ft"]}
    ba, lo, hi = fed[8].metrics["balanced_accuracy"]
    assert ba == pytest.approx(written["arms"]["fed-mae-ft"]["8"]["balanced_accuracy"])
    assert lo is not None and hi is not None and lo <= ba <= hi
    assert dict(experiment.endpoint)["difference"] == f"{ep['difference']:g}" or "difference" in dict(
        experiment.endpoint)
    assert [p.name for p in experiment.plots] == ["accuracy_vs_k.png", "reconstruction.png"]
    html = experiment_section(out)
    assert html.count("<tr><td class=\"name\">") == sum(len(v) for v in written["arms"].values())
    for arm in ARMS:
        assert arm in html
    assert "Primary endpoint" in html and html.count("data:image/png;base64,") >= 4
