"""`lungmae experiment --site ...`: the same arms on prepared site caches instead of the built-in phantoms.

Two labelled hospitals and one without any label, written as DICOM by `lungmae synth` and prepared by
`lungmae site prepare` (the path a researcher's own data takes); the unlabelled one pretrains only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungmae_cli.main import main


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_arm_runs_on_prepared_caches_and_the_unlabelled_site_only_pretrains(tmp_path: Path) -> None:
    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from lungmae_cli.synth import write_synthetic_sites

    paths = write_synthetic_sites(tmp_path / "sites", sites=2, scans_per_site=12, shape=(40, 64, 64),
                                  labelled_fraction=1.0, unlabelled_sites=1, preprocess_size=32, workers=1)
    for path in paths:
        prepare_site(load_site_config(path), workers=1, progress=False)
    out = tmp_path / "out"
    assert main(["experiment", "--profile", "tiny", "--out", str(out), "--threads", "1",
                 "--site", *map(str, paths)]) == 0
    written = json.loads((out / "experiment.json").read_text())
    assert written["source"] == "site-caches"
    sites = {s["name"]: s for s in written["sites"]}
    assert [s["labelled"] for s in sites.values()] == [True, True, False]  # labelled sites first
    assert sites["site2"]["scans"] == 12  # every unlabelled scan pretrains; none is held out for testing
    assert {"fed-mae-ft", "fed-scratch", "central-mae-ft", "baseline-histogram"} <= set(written["arms"])
    assert {r["mae"] for r in written["reconstruction"]} >= {"federated", "centralized"}
    # k is capped by the sites' labels per class; every arm reports exactly the ks that fit, and the endpoint
    # (k = 8) has a difference only when k = 8 is among them
    ks = {str(k) for k in written["profile"]["ks"]}
    assert ks and set(written["arms"]["fed-mae-ft"]) == ks
    ep = written["endpoint"]
    assert ("difference" in ep) == ("8" in ks)
    if "difference" in ep:  # only when k = 8 fits the sites' label counts
        assert ep["ci"][0] <= ep["difference"] <= ep["ci"][1]
