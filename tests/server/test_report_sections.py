"""The cross-site matrix (server/cross_site.py, server/report/cross_site.py) and the experiment section
(server/report/experiment.py): structure, suppression, lenient reading, and what the page shows."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from server.cross_site import build_cross_site, read_cross_site
from server.report import render_report
from server.report.cross_site import cross_site_section, global_per_site_table
from server.report.experiment import experiment_section, read_experiment
from tests.server.test_report import parse, section_text, write_run

SITES = ["a", "b", "c"]


def _scores() -> dict[tuple[str, str], dict[str, float | None]]:
    scores: dict[tuple[str, str], dict[str, float | None]] = {}
    for i, model in enumerate(["global", "a", "c"]):
        for j, site in enumerate(SITES):
            if (model, site) == ("c", "b"):
                continue  # not evaluated
            scores[(model, site)] = {"balanced_accuracy": 0.5 + 0.1 * i - 0.05 * j,
                                     "roc_auc": None if site == "c" else 0.7, "num_examples": 4 + 4 * j}
    return scores


def test_build_cross_site_shapes_names_and_suppression() -> None:
    out = build_cross_site(_scores(), models=["global", "a", "c"], data_sites=SITES, min_count={"a": 5, "b": 8})
    assert out["format"] == 1 and out["models"] == ["global", "a", "c"] and out["data_sites"] == SITES
    assert out["min_count"] == {"a": 5, "b": 8, "c": 10}  # c states none: the default
    # a has 4 scans < 5: withheld; b has 8 >= 8: shown; c has 12 >= 10: shown; (c, b) not evaluated.
    assert out["num_examples"] == [[None, 8, 12], [None, 8, 12], [None, None, 12]]
    assert out["suppressed"] == [[True, False, False], [True, False, False], [True, False, False]]
    assert out["metrics"]["balanced_accuracy"][2] == [pytest.approx(0.7), None, pytest.approx(0.6)]
    assert out["metrics"]["roc_auc"][0] == [0.7, 0.7, None]
    json.dumps(out, allow_nan=False)  # JSON-ready: no NaN
    matrix, why = read_cross_site(out)
    assert why == "" and matrix is not None and matrix.cell("balanced_accuracy", "c", "c") == pytest.approx(0.6)
    assert matrix.cell("roc_auc", "global", "c") is None and matrix.min_count["c"] == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(models=["global", "global"], data_sites=SITES), "unique"),
    (dict(models=["global"], data_sites=["a", ""]), "non-empty"),
    (dict(models=["global"], data_sites=["a"]), "outside the matrix"),
])
def test_build_cross_site_refuses_bad_names(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_cross_site({("global", "b"): {"balanced_accuracy": 0.5}} if "outside" in message else {}, **kwargs)


@pytest.mark.parametrize("raw, why", [
    (None, "no cross-site matrix"),
    ({"a": {"accuracy": 0.5}}, "no cross-site matrix"),  # the old global-per-site form
    ({"models": [], "data_sites": ["a"]}, "names no models"),
    ({"models": ["global"], "data_sites": ["a"], "metrics": {"roc_auc": [[0.5, 0.6]]}}, "not a 1 x 1 matrix"),
    ({"models": ["global"], "data_sites": ["a"], "metrics": {}}, "holds no metric matrix"),
])
def test_read_cross_site_explains_what_is_wrong(raw: object, why: str) -> None:
    matrix, text = read_cross_site(raw)
    assert matrix is None and why in text
    assert why in cross_site_section({"final": {"cross_site": raw}})


def test_old_form_is_labelled_global_model_per_site() -> None:
    per_site = {"a": {"accuracy": 0.5, "balanced_accuracy": 0.4}}
    same = {"final": {"cross_site": {"a": {"accuracy": 0.5, "balanced_accuracy": 0.4}}}}
    assert global_per_site_table(same, per_site) == ""  # repeats the final table: left out
    other = {"final": {"cross_site": {"a": {"accuracy": 0.6}, "b": {"accuracy": 0.7}}}}
    html = global_per_site_table(other, per_site)
    assert "global model per site" in html and "not a cross-site matrix" in html and ">b<" in html
    matrix = {"final": {"cross_site": build_cross_site({}, models=["global"], data_sites=["a"])}}
    assert global_per_site_table(matrix, per_site) == ""


def test_report_shows_the_matrix_with_withheld_counts(tmp_path: Path) -> None:
    matrix = build_cross_site({("global", "hospital-a"): {"balanced_accuracy": 0.7, "roc_auc": 0.8, "num_examples": 8},
                               ("hospital-b", "hospital-a"): {"balanced_accuracy": 0.3, "roc_auc": 0.6,
                                                              "num_examples": 8}},
                              models=["global", "hospital-b"], data_sites=["hospital-a", "hospital-b"],
                              min_count={"hospital-a": 10})
    page, text = parse(render_report(write_run(tmp_path / "run", cross_site=matrix), reconstructions=False))
    assert page.tables["cross-site-matrix"][1:] == [["global model", "hospital-a", "0.700", "0.800", "< 10"],
                                                    ["hospital-b (local)", "hospital-a", "0.300", "0.600", "< 10"]]
    assert len([i for i in page.images if i["section"] == "cross-site"]) == 2
    assert "global model per site" in section_text(page, "final-metrics")
    assert "cross-site-table" not in page.tables  # the matrix replaces the old table


# ------------------------------------------------------------------------------------------------ experiment


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data", [
    # arms as a list, per-k results as a list, metric objects with ci95
    {"arms": [{"name": "fed-mae", "results": [
        {"k": 8, "balanced_accuracy": {"mean": 0.6, "ci95": [0.5, 0.7]}, "roc_auc": {"mean": 0.8, "ci95": [0.7, 0.9]},
         "seeds": [0, 1, 2]},
        {"k": 4, "balanced_accuracy": {"mean": 0.5, "ci95": [0.4, 0.6]}}]}]},
    # arms as a mapping, per-k as a mapping of strings, other spellings
    {"arms": {"fed-mae": {"by-k": {"8": {"balancedAccuracy": {"value": 0.6, "low": 0.5, "high": 0.7},
                                         "roc-auc": 0.8, "roc-auc-ci95": [0.7, 0.9], "seeds": 3},
                                   "4": {"balanced-accuracy": 0.5, "balanced-accuracy-low": 0.4,
                                         "balanced-accuracy-high": 0.6}}}}},
    # flat rows
    {"results": [{"arm": "fed-mae", "k": 4, "balanced_accuracy": 0.5, "balanced_accuracy_ci95": [0.4, 0.6]},
                 {"arm": "fed-mae", "labels_per_class": 8, "balanced_accuracy": {"estimate": 0.6, "ci": [0.5, 0.7]},
                  "roc_auc": {"point": 0.8, "interval": {"lo": 0.7, "hi": 0.9}}, "seeds": 3}]},
])
def test_experiment_shapes_read_alike(tmp_path: Path, data: dict) -> None:
    (tmp_path / "experiment.json").write_text(json.dumps(data))
    experiment, why = read_experiment(tmp_path)
    assert why == "" and experiment is not None and list(experiment.arms) == ["fed-mae"]
    points = experiment.arms["fed-mae"]
    assert [p.k for p in points] == [4.0, 8.0]
    assert points[0].metrics == {"balanced_accuracy": (0.5, 0.4, 0.6)}
    assert points[1].metrics == {"balanced_accuracy": (0.6, 0.5, 0.7), "roc_auc": (0.8, 0.7, 0.9)}
    html = experiment_section(tmp_path)
    assert "0.600 <span class=\"ci\">[0.500, 0.700]</span>" in html and html.count("<img") == 2


def test_experiment_section_absent_unusable_and_plots(tmp_path: Path) -> None:
    assert experiment_section(tmp_path) == ""  # no experiment.json: no section
    (tmp_path / "experiment.json").write_text("{not json")
    assert "could not be read" in experiment_section(tmp_path)
    (tmp_path / "experiment.json").write_text(json.dumps({"arms": [{"name": "x", "results": [{"k": 4}]}]}))
    assert "holds no arm with a balanced accuracy" in experiment_section(tmp_path)
    (tmp_path / "acc_vs_k.png").write_bytes(_png())
    outside = tmp_path.parent / "outside.png"
    outside.write_bytes(_png())
    (tmp_path / "experiment.json").write_text(json.dumps({
        "primary_endpoint": "fed MAE minus fed scratch at k = 8: +0.10 [0.02, 0.18]",
        "plots": ["acc_vs_k.png", "../outside.png", "missing.png"],
        "arms": {"a": [{"k": 8, "balanced_accuracy": 0.6}]}}))
    html = experiment_section(tmp_path)
    assert "Primary endpoint" in html and "+0.10 [0.02, 0.18]" in html
    assert html.count("data:image/png;base64,") == 2  # the balanced-accuracy plot (no ROC AUC given) + its PNG
    assert base64.b64encode(_png()).decode() in html and "outside" not in html


def test_report_of_an_experiment_folder_alone(tmp_path: Path) -> None:
    (tmp_path / "experiment.json").write_text(json.dumps({"arms": {"a": [{"k": 8, "balanced_accuracy": 0.6}]}}))
    page, _ = parse(render_report(tmp_path))
    assert set(page.sections) == {"experiment"} and page.tables["experiment-table"][1][:3] == ["a", "8", "0.600"]


def test_experiment_section_sits_in_a_run_report(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run")
    (run_dir / "experiment.json").write_text(json.dumps({"arms": {"a": [{"k": 8, "balanced_accuracy": 0.6}]}}))
    page, text = parse(render_report(run_dir, reconstructions=False))
    assert "experiment" in page.sections and '<a href="#experiment">' in text
