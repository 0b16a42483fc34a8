"""Tests of server/report/render.py (and report_data, report_recon, plots): the self-contained report.html of a run."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lungmae_cli.main import main as lungmae_main
from lungmae_core.config import model_config, to_mapping
from lungmae_core.contract import CONTRACT_VERSION
from lungmae_core.model import build_mae
from server.checkpoints import Checkpoint, CheckpointStore, atomic_write_json
from server.federation_config import config_hash, federation_from_mapping, federation_to_mapping
from server.report import render_report
from server.report.data import RunDirectoryError, confusion_matrix, load_run, norm_key
from server.report.markup import _looks_like_path
from server.report.recon import find_mae_checkpoint, lung_centre, reconstruct

SITES = ("hospital-a", "hospital-b", "hospital-c")  # hospital-c has no labels: pretrain only
CLASSES = ["normal", "ggo", "fibrosis", "emphysema"]
SECRET_PATH = "/srv/hospital-a/dicom/PATIENT-0042"  # must never reach the page
TINY = model_config("tiny", img_size=32)  # 8 patches of 16^3: a fast MAE for the reconstruction


# ------------------------------------------------------------------------------------------------ fixtures


def _line(r: int, phase: str, phase_round: int, phase_rounds: int, train: dict[str, Any], evaluate: dict[str, Any],
          *, failed: tuple[str, ...] = (), rejected: tuple[str, ...] = (), down: int, up: int) -> dict[str, Any]:
    """One ``metrics.jsonl`` record exactly as ``server/runner.py`` (``_record``) writes it."""
    def mean(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
        n = sum(m["num_examples"] for m in sites.values())
        keys = [k for k in next(iter(sites.values())) if k != "num_examples" and not isinstance(
            next(iter(sites.values()))[k], list)]
        return {"num_examples": n, **{k: sum(m[k] * m["num_examples"] for m in sites.values()) / n for k in keys}}

    return {"contract_version": CONTRACT_VERSION, "round": r, "phase": phase, "phase_round": phase_round,
            "phase_rounds": phase_rounds, "step": r,
            "train": {"aggregated": mean(train), "sites": train},
            "evaluate": {"aggregated": mean(evaluate), "sites": evaluate},
            "participation": {"sampled": sorted({*train, *failed, *rejected}), "replied": sorted(train),
                              "failed": list(failed), "rejected": list(rejected)},
            "failures": [{"site": s, "reason": "timed out"} for s in failed],
            "rejected_updates": [{"site": s, "check": "norm", "reason": "norm 1e9 > 1000"} for s in rejected],
            "bytes": {"down": down, "up": up}, "skipped": False, "note": "", "duration_s": 1.5}


def _eps(site_index: int, server_round: int, dp: bool) -> float:
    """The site's running total epsilon after ``server_round`` (CONTRACTS.md: replies carry the total)."""
    return round(0.4 * (site_index + 1) * server_round, 3) if dp else 0.0


def _pretrain_line(r: int, rounds: int, *, dp: bool, mae_wins: bool) -> dict[str, Any]:
    failed = ("hospital-c",) if r == 2 else ()
    train = {s: {"num_examples": 10, "loss": 0.3 / r + 0.01 * i, "loss_lung": 0.3 / r,
                 "loss_non_lung": 0.1, "epsilon": _eps(i, r, dp), "train_seconds": 3.0,
                 "update_bytes": 1000} for i, s in enumerate(SITES) if s not in failed}
    l1 = 0.10 if mae_wins else 0.30
    evaluate = {s: {"num_examples": 4, "l1_masked": l1, "l1_masked_lung": l1 + 0.02, "baseline_l1_masked": 0.2,
                    "baseline_l1_masked_lung": 0.25, "epsilon": _eps(i, r, dp)} for i, s in enumerate(SITES)}
    return _line(r, "pretrain", r, rounds, train, evaluate, failed=failed,
                 down=3_000_000, up=1_000_000 * len(train))


def _finetune_line(r: int, phase_round: int, rounds: int, *, dp: bool) -> dict[str, Any]:
    labelled = SITES[:2]
    rejected = ("hospital-b",) if phase_round == 2 else ()
    train = {s: {"num_examples": 8, "loss": 1.2 / r, "accuracy": 0.2 * r, "epsilon": _eps(i, r, dp),
                 "train_seconds": 2.0, "update_bytes": 500} for i, s in enumerate(labelled) if s not in rejected}
    evaluate = {s: {"num_examples": 4, "loss": 1.0 / r, "accuracy": 0.1 * r, "balanced_accuracy": 0.09 * r,
                    "weighted_f1": 0.1 * r, "roc_auc": 0.7, "classes_present": 4, "epsilon": _eps(i, r, dp)}
                for i, s in enumerate(labelled)}
    return _line(r, "finetune", phase_round, rounds, train, evaluate, rejected=rejected, down=1_000_000, up=500_000)


def write_run(run_dir: Path, *, pretrain: int = 2, finetune: int = 2, dp: bool = False, mae_wins: bool = True,
              final: bool = True, checkpoint: bool = False, cross_site: dict[str, Any] | None = None) -> Path:
    """A run directory in the server's format (``server/runner.py``), with the server's own writers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = federation_from_mapping({
        "run-dir": str(run_dir), "server": {"root-certificates": SECRET_PATH + "/ca.pem"},
        "phases": {"pretrain": {"rounds": pretrain}, "finetune": {"rounds": finetune}},
        "privacy": {"require-dp": dp}})
    plan = [f"pretrain-{i}" for i in range(1, pretrain + 1)] + ["handoff"] + \
        [f"finetune-{i}" for i in range(1, finetune + 1)] + ["final"]
    atomic_write_json(run_dir / "run_config.json", {
        "federation": federation_to_mapping(fed), "config_hash": config_hash(fed), "model_config": to_mapping(TINY),
        "class_names": CLASSES, "plan": plan, "code_version": "lungmae-fl 0.1.0 (git abc1234)"})
    lines = [_pretrain_line(r, pretrain, dp=dp, mae_wins=mae_wins) for r in range(1, pretrain + 1)]
    lines += [_finetune_line(pretrain + k, k, finetune, dp=dp) for k in range(1, finetune + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    if checkpoint and pretrain:
        mae = build_mae(TINY, seed=0)
        CheckpointStore(run_dir).save(Checkpoint(
            step_index=pretrain - 1, phase="pretrain", server_round=pretrain, weights=mae.state_dict(),
            strategy_state={}, history=lines[:pretrain], config_hash=config_hash(fed),
            model_args={"model": to_mapping(TINY), "num_classes": 4, "kind": "mae"}))
    summary: dict[str, Any] = {"status": "completed" if final else "running", "config_hash": config_hash(fed),
                               "class_names": CLASSES, "sites": {
                                   s: {"name": s, "num_unlabelled": 20 if i == 2 else 4,
                                       "num_labelled_train": 0 if i == 2 else 12,
                                       "num_labelled_val": 0 if i == 2 else 4,
                                       "num_labelled_test": 0 if i == 2 else 8 - 2 * i, "dp_enabled": dp,
                                       "epsilon_budget": (4.0 if i == 2 else 8.0) if dp else 0.0,
                                       "has_gpu": False, "error": ""} for i, s in enumerate(SITES)}}
    if final and finetune:
        sites = {"hospital-a": {"num_examples": 8, "loss": 0.9, "accuracy": 0.75, "balanced_accuracy": 0.7,
                                "weighted_f1": 0.72, "roc_auc": 0.88, "classes_present": 4, "epsilon": 0.0,
                                "confusion_matrix": [[2, 0, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [1, 0, 0, 1]]},
                 "hospital-b": {"num_examples": 6, "loss": 1.1, "accuracy": 0.5, "balanced_accuracy": 0.5,
                                "weighted_f1": 0.45, "roc_auc": None, "classes_present": 3, "epsilon": 0.0,
                                "confusion_matrix": [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]]}}
        summary["final"] = {
            "class_names": CLASSES, "sites": sites,
            "pooled": {"num_examples": 14, "accuracy": 0.64, "balanced_accuracy": 0.61, "weighted_f1": 0.6,
                       "roc_auc": 0.8, "classes_present": 4,
                       "confusion_matrix": [[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 3, 1], [1, 0, 1, 1]]},
            "cross_site": cross_site if cross_site is not None else {
                s: {k: m[k] for k in ("accuracy", "balanced_accuracy", "weighted_f1", "roc_auc", "num_examples")}
                for s, m in sites.items()},
            "failures": [], "rejected": [], "bytes": {"down": 1000, "up": 100}, "note": ""}
    elif final:
        summary["final"] = {"class_names": CLASSES, "sites": {}, "pooled": {}, "cross_site": {},
                            "note": f"no site has a test split (see {SECRET_PATH}/site.yaml)"}
    atomic_write_json(run_dir / "metrics.json", summary)
    return run_dir


class _Page(HTMLParser):
    """Collects what the tests check: section ids, images, tables (cell text per row), links, all text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[tuple[str, str]] = []
        self.classes: list[str] = []
        self._section: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.classes.extend(a.get("class", "").split())
        for key in ("src", "href"):
            if key in a:
                self.links.append((tag, a[key]))
        if tag == "section":
            self._section = a["id"]
            self.sections[self._section] = []
        elif tag == "img":
            self.images.append({**a, "section": self._section or ""})
        elif tag == "table":
            self._table = a.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.sections[self._section].append(data)


def parse(path: Path) -> tuple[_Page, str]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return page, text


def section_text(page: _Page, ident: str) -> str:
    return " ".join(" ".join(page.sections[ident]).split())


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _Page, str]:
    from server.cross_site import build_cross_site

    matrix = build_cross_site({("global", "hospital-a"): {"balanced_accuracy": 0.7, "roc_auc": 0.88, "num_examples": 8},
                               ("global", "hospital-b"): {"balanced_accuracy": 0.5, "roc_auc": None, "num_examples": 6},
                               ("hospital-a", "hospital-a"): {"balanced_accuracy": 0.8, "roc_auc": 0.9,
                                                              "num_examples": 8},
                               ("hospital-a", "hospital-b"): {"balanced_accuracy": 0.4, "roc_auc": 0.6,
                                                              "num_examples": 6}},
                              models=["global", "hospital-a"], data_sites=["hospital-a", "hospital-b"],
                              min_count={"hospital-a": 5, "hospital-b": 10})
    run_dir = write_run(tmp_path_factory.mktemp("run") / "run-full", dp=True, checkpoint=True, cross_site=matrix)
    path = render_report(run_dir)
    page, text = parse(path)
    return run_dir, page, text


# ------------------------------------------------------------------------------------------------ the page


def test_full_report_has_every_section_table_and_image(full_report: tuple[Path, _Page, str]) -> None:
    run_dir, page, _ = full_report
    assert set(page.sections) == {"summary", "loss", "reconstructions", "final-metrics", "cross-site",
                                  "participation", "bytes", "privacy", "config"}
    sections_with_images = {img["section"] for img in page.images}
    assert sections_with_images == {"loss", "reconstructions", "final-metrics", "cross-site", "participation",
                                    "bytes", "privacy"}
    assert len([i for i in page.images if i["section"] == "cross-site"]) == 2  # balanced accuracy, ROC AUC
    assert page.tables["cross-site-matrix"][1:] == [
        ["global model", "hospital-a", "0.700", "0.880", "8"],
        ["global model", "hospital-b", "0.500", "–", "< 10"],  # 6 scans < hospital-b's minimum of 10: withheld
        ["hospital-a (local)", "hospital-a", "0.800", "0.900", "8"],
        ["hospital-a (local)", "hospital-b", "0.400", "0.600", "< 10"]]
    # pretrain + finetune training loss, pretrain validation vs baseline, finetune validation
    assert len([i for i in page.images if i["section"] == "loss"]) == 4
    final = page.tables["final-table"]
    assert final[0] == ["site", "accuracy", "balanced accuracy", "weighted F1", "ROC AUC", "test scans"]
    assert final[1] == ["hospital-a", "0.7500", "0.7000", "0.7200", "0.8800", "8"]
    assert final[2][0] == "hospital-b" and final[2][4] == "n/a"  # roc_auc null: undefined, not 0.0
    assert final[3][0].startswith("pooled") and final[3][1:] == ["0.6400", "0.6100", "0.6000", "0.8000", "14"]
    participation = page.tables["participation-table"]
    assert participation[0][:6] == ["round", "phase", "sampled", "replied", "failed", "rejected"]
    assert participation[2] == ["2", "pretrain", "3", "2", "1", "0", "failed hospital-c: timed out"]
    assert participation[4] == ["4", "finetune", "2", "1", "0", "1", "rejected hospital-b (norm): norm 1e9 > 1000"]
    assert participation[1][-1] == ""
    assert page.tables["bytes-table"][-1] == ["total", "", "8,000,000", "6,000,000"]
    privacy = page.tables["privacy-table"]
    assert privacy[0] == ["site", "epsilon spent", "budget", "of budget", "rounds trained"]
    assert privacy[1:] == [["hospital-a", "1.600", "8.000", "20%", "4"],  # total after round 4
                           ["hospital-b", "3.200", "8.000", "40%", "3"],  # round 4 update rejected, evaluated
                           ["hospital-c", "2.400", "4.000", "60%", "1"]]  # failed round 2's training, no labels
    assert page.tables["sites-table"][1:] == [
        ["hospital-a", "4", "12", "4", "8", "yes", "no", "4"],
        ["hospital-b", "4", "12", "4", "6", "yes", "no", "3"],
        ["hospital-c", "20", "0", "0", "0", "yes", "no", "1"]]


def test_images_are_inline_pngs_and_nothing_is_fetched(full_report: tuple[Path, _Page, str]) -> None:
    _, page, text = full_report
    assert page.images
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,"), img["src"][:40]
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert img["alt"]
    external = [(tag, url) for tag, url in page.links if not (url.startswith("data:") or url.startswith("#"))]
    assert external == []
    assert "<script" not in text and "@import" not in text and "url(" not in text


def test_no_path_or_identifier_reaches_the_page(full_report: tuple[Path, _Page, str]) -> None:
    run_dir, page, text = full_report
    for secret in (str(run_dir), run_dir.name, SECRET_PATH, "PATIENT-0042", "/srv/", str(Path.home())):
        assert secret not in text, secret
    config = dict((row[0], row[1]) for t in ("config-table", "config-table-2") for row in page.tables[t][1:])
    assert config["federation.run-dir"] == "(a path: withheld from the report)"
    assert config["federation.server.root-certificates"] == "(a path: withheld from the report)"
    assert config["federation.server.certificate"] == ""  # empty: nothing to withhold
    assert config["federation.model.name"] == "tiny" and config["federation.phases.pretrain.rounds"] == "2"
    assert config["model_config.img-size"] == "32" and config["federation.strategy.name"] == "fedavg"


def test_reconstruction_is_computed_on_a_phantom_and_says_so(full_report: tuple[Path, _Page, str]) -> None:
    _, page, _ = full_report
    text = section_text(page, "reconstructions")
    assert "synthetic phantom" in text and "No hospital scan leaves a site" in text
    assert "after server round 2" in text
    rows = {row[0]: row for row in page.tables["mae-table"][1:]}
    assert set(rows) == {*SITES, "all sites (aggregated)", "synthetic phantom (at the server)"}
    phantom = rows["synthetic phantom (at the server)"]
    assert phantom[1] == "4" and all(math.isfinite(float(v)) for v in phantom[2:6])


@pytest.mark.parametrize("mae_wins, css_class, phrase", [
    (True, "ok", 'The MAE beat the trivial "average patch" predictor'),
    (False, "flag", 'The MAE did not beat the trivial "average patch" predictor'),
])
def test_mae_against_average_patch_flag(tmp_path: Path, mae_wins: bool, css_class: str, phrase: str) -> None:
    run_dir = write_run(tmp_path / "run", mae_wins=mae_wins)
    page, text = parse(render_report(run_dir, reconstructions=False))
    assert phrase in section_text(page, "summary")
    assert f'class="{css_class}" id="mae-flag"' in text
    aggregated = next(r for r in page.tables["mae-table"] if r[0] == "all sites (aggregated)")
    # both numbers are shown, the MAE's and the baseline's
    assert aggregated[1:6] == (["12", "0.1000", "0.2000", "0.1200", "0.2500"] if mae_wins
                               else ["12", "0.3000", "0.2000", "0.3200", "0.2500"])


def test_single_scan_baseline_gives_no_verdict(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finetune=0)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:  # what a site with one validation scan reports: the average patch is that scan
        for m in [line["evaluate"]["aggregated"], *line["evaluate"]["sites"].values()]:
            m.update({"num_examples": 1, "baseline_l1_masked": 0.0, "baseline_l1_masked_lung": 0.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    page, text = parse(render_report(run_dir, reconstructions=False))
    assert 'class="warn" id="mae-flag"' in text
    assert 'No verdict on the MAE against the "average patch" predictor' in section_text(page, "summary")
    assert page.tables["mae-table"][1][-1] == "–"


@pytest.mark.slow
def test_report_of_a_run_written_by_the_real_server(tmp_path_factory: pytest.TempPathFactory,
                                                     flower_task_identity: None) -> None:
    """The federation runner itself writes the run directory (in-process grid, real ClientApps), so the
    reader is checked against the writer, not against this file's idea of it."""
    from client.client_app import make_client_app
    from server.runner import FederationRunner
    from tests.federated_helpers import InProcessGrid, broken_site, prepared_sites

    root = tmp_path_factory.mktemp("real-sites")
    sites = prepared_sites(root) + [broken_site(root)]  # the same key as the server tests: prepared once
    run_dir = tmp_path_factory.mktemp("real-run") / "run"
    cfg = federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": 1, "lr": 1e-3}, "finetune": {"rounds": 1, "lr": 1e-3}},
        "run-dir": str(run_dir), "round-timeout-s": 5}, source="test")
    FederationRunner(cfg, InProcessGrid(make_client_app(sites), [{"partition-id": i} for i in range(3)])).run()
    page, text = parse(render_report(run_dir))
    assert {img["section"] for img in page.images} == {"loss", "reconstructions", "final-metrics", "participation",
                                                       "bytes", "cross-site"}
    # the runner's cross-site step: global + both sites' local models, each scored at both sites
    assert {tuple(row[:2]) for row in page.tables["cross-site-matrix"][1:]} == {
        (m, s) for m in ("global model", "site0 (local)", "site1 (local)") for s in ("site0", "site1")}
    assert [row[:2] for row in page.tables["participation-table"][1:]] == [["1", "pretrain"], ["2", "finetune"]]
    assert {row[0] for row in page.tables["final-table"][1:]} == {"site0", "site1", "pooled (all test scans)"}
    assert [row[0] for row in page.tables["sites-table"][1:]] == ["node-103", "site0", "site1"]
    assert "cannot serve" in page.tables["sites-table"][1][-1]  # the broken site says why
    assert "after server round 1" in section_text(page, "reconstructions")
    assert "Differential privacy was not used" in section_text(page, "privacy")
    for secret in (str(root), str(run_dir), "no-cache"):
        assert secret not in text


# ------------------------------------------------------------------------------------------------ partial runs


@pytest.mark.parametrize("kwargs, expected", [
    (dict(finetune=0), [("final-metrics", 'metrics.json has no "final" results'),
                        ("final-metrics", "The server noted: no site has a test split (see (path withheld))"),
                        ("loss", "No finetune round recorded a training loss")]),
    (dict(final=False), [("final-metrics", 'metrics.json has no "final" results'),
                         ("summary", "status: running")]),
    (dict(dp=False), [("privacy", "Differential privacy was not used in this run")]),
    (dict(checkpoint=False), [("reconstructions", "holds no checkpoint with the MAE")]),
    (dict(pretrain=0), [("loss", "No pretrain round recorded a training loss"),
                        ("reconstructions", "No pretrain evaluation")]),
])
def test_absent_parts_are_left_out_with_a_sentence(tmp_path: Path, kwargs: dict[str, Any],
                                                   expected: list[tuple[str, str]]) -> None:
    run_dir = write_run(tmp_path / "run", **{"checkpoint": False, **kwargs})
    page, _ = parse(render_report(run_dir, reconstructions="checkpoint" in kwargs))
    for section, sentence in expected:
        assert sentence in section_text(page, section), (section, sentence)


def test_central_dp_epsilon_of_the_server_is_shown(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finetune=0)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for k, line in enumerate(lines, start=1):  # what server/strategy.py adds to the train aggregate
        line["train"]["aggregated"].update({"central_epsilon": 1.5 * k, "central_clipped": k - 1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    page, _ = parse(render_report(run_dir, reconstructions=False))
    assert page.tables["central-dp-table"] == [["round", "central epsilon (total)", "updates clipped"],
                                               ["1", "1.500", "0"], ["2", "3.000", "1"]]
    assert "No site trained with DP-SGD" in section_text(page, "privacy")


def test_run_without_any_round_renders_every_section_with_a_sentence(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finetune=0, final=False)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.json").unlink()
    page, _ = parse(render_report(run_dir))
    assert not page.images
    assert "metrics.jsonl is absent: no round finished" in section_text(page, "summary")
    for section, sentence in (("participation", "The rounds recorded no participation counts."),
                              ("bytes", "The rounds recorded no byte counts."),
                              ("privacy", "No site reported an epsilon"),
                              ("reconstructions", "holds no checkpoint with the MAE")):
        assert sentence in section_text(page, section), section


def test_cut_off_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finetune=1, final=False)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    skipped = json.loads(lines[1])
    skipped.update(skipped=True, note="0 valid updates, fewer than min-sites 1; the global model is kept")
    lines[1] = json.dumps(skipped)
    lines.append('{"round": 4, "phase": "finetune", "train": {"aggre')  # the server died while appending
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    run = load_run(run_dir)
    assert [r.server_round for r in run.rounds] == [1, 2, 3]
    page, _ = parse(render_report(run_dir, reconstructions=False))
    summary = section_text(page, "summary")
    assert "metrics.jsonl line 4 is cut off" in summary
    assert "Rounds skipped (too few valid updates; the model was kept): 2." in summary
    assert page.tables["participation-table"][2][-1].startswith(
        "skipped: 0 valid updates, fewer than min-sites 1; the global model is kept")


def test_resumed_round_logged_twice_keeps_the_later_line(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", finetune=0)
    line = _pretrain_line(2, 2, dp=False, mae_wins=True)
    line["train"]["aggregated"]["loss"] = 0.01
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    run = load_run(run_dir)
    assert [r.server_round for r in run.rounds] == [1, 2]
    assert run.rounds[1].train_aggregated["loss"] == 0.01


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("setup, message", [
    ("missing", "Unable to read run directory {d} as it does not exist or is not a directory"),
    ("empty", "Unable to read run directory {d} as it has neither run_config.json nor metrics.jsonl"),
    ("bad-json-line", "Unable to parse {d}/metrics.jsonl line 1 as it is not valid JSON"),
    ("no-round", "{d}/metrics.jsonl line 2 is not a round record of this version: round record: missing"),
    ("old-version", "{d}/metrics.jsonl line 1 is not a round record of this version: round record: contract "
                    "version None but this side speaks version"),
    ("bad-summary", "Unable to parse {d}/metrics.json as it is not valid JSON"),
    ("config-list", "{d}/run_config.json must hold a JSON object; got list"),
    ("workdir", "as it has neither run_config.json nor metrics.jsonl; pass the directory the server wrote "
                "(federation.yaml 'run-dir'); did you mean {d}/run?"),
])
def test_bad_run_directory_errors_name_file_and_line(tmp_path: Path, setup: str, message: str) -> None:
    d = tmp_path / "run"
    if setup != "missing":
        d.mkdir()
    if setup == "bad-json-line":
        (d / "metrics.jsonl").write_text('{"round": 1,, }\n{"round": 2, "phase": "pretrain"}\n')
    elif setup == "no-round":
        good = _pretrain_line(1, 1, dp=False, mae_wins=True)
        bad = {k: v for k, v in good.items() if k != "round"}
        (d / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    elif setup == "old-version":  # a run written before the typed contract (kebab-case metric keys)
        (d / "metrics.jsonl").write_text('{"round": 1, "phase": "pretrain"}\n')
    elif setup == "bad-summary":
        (d / "run_config.json").write_text("{}")
        (d / "metrics.json").write_text('{"final": ')
    elif setup == "config-list":
        (d / "run_config.json").write_text("[]")
    elif setup == "workdir":  # `lungmae simulate --workdir d` puts the run in d/run
        (d / "sites").mkdir()
        (d / "run").mkdir()
        (d / "run" / "run_config.json").write_text("{}")
    with pytest.raises(RunDirectoryError) as info:
        render_report(d, reconstructions=False)
    assert message.format(d=d) in str(info.value)


def test_cli_renders_to_out_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "elsewhere" / "page.html"
    assert lungmae_main(["report", str(run_dir), "--out", str(out), "--no-reconstructions"]) == 0
    assert out.exists() and not (run_dir / "report.html").exists()
    assert f"report written: {out}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]  # no temporary file left behind
    assert lungmae_main(["report", str(tmp_path / "nope")]) == 2
    assert "as it does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ pieces


def test_reconstruct_keeps_visible_patches_and_blanks_masked_ones() -> None:
    mae = build_mae(TINY, seed=0).eval()
    image = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32)
    masked, recon = reconstruct(mae, image, seed=3)
    nan = np.isnan(masked)
    assert nan.sum() == 6 * 16 ** 3  # 75% of 8 patches masked, whole patches
    np.testing.assert_array_equal(masked[~nan], image[~nan])
    np.testing.assert_array_equal(recon[~nan], image[~nan])
    assert np.all((recon[nan] >= 0) & (recon[nan] <= 1)) and not np.allclose(recon[nan], image[nan])
    # Same seed, same mask and result: a report renders the same twice.
    again, recon2 = reconstruct(mae, image, seed=3)
    np.testing.assert_array_equal(np.isnan(again), nan)
    np.testing.assert_array_equal(recon2, recon)


def test_mae_checkpoint_survives_pruning_after_the_hand_off(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", checkpoint=True)
    store = CheckpointStore(run_dir)
    for step in range(2, 5):  # hand-off and finetune checkpoints push the pretrain step file out (two kept)
        store.save(Checkpoint(step_index=step, phase="finetune", server_round=1 + step,
                              weights={"head.weight": torch.zeros(4, 192)}, strategy_state={}, history=[],
                              config_hash="0" * 64, model_args={}))
    run = load_run(run_dir)
    assert [p.name for p in run.checkpoints] == ["mae-latest.pt", "step-0003.pt", "step-0004.pt"]
    found = find_mae_checkpoint(run)
    assert found is not None and found[0].name == "mae-latest.pt" and found[1]["server_round"] == 2


@pytest.mark.parametrize("planes, expected", [
    ({"d": 5, "h": 2, "w": 7}, (5, 2, 7)),  # one lung voxel
    ({}, (4, 5, 6)),  # no lung: the centre
])
def test_lung_centre_picks_the_planes_with_most_lung(planes: dict[str, int], expected: tuple[int, int, int]) -> None:
    lung = np.zeros((8, 10, 12), np.uint8)
    if planes:
        lung[planes["d"], planes["h"], planes["w"]] = 1
    assert lung_centre(lung) == expected


@pytest.mark.parametrize("key, value, expected", [
    ("plan", "pretrain 1/2", False), ("fraction", "1/2", False), ("superlink", "127.0.0.1:9091", False),
    ("code_version", "lungmae-fl 0.1.0 (git 3e690e6)", False), ("private-key", "", False),
    ("anything", "/srv/site/ca.pem", True), ("anything", "~/runs", True), ("anything", "./runs", True),
    ("anything", "runs/simulate/run", True), ("anything", "C:\\data\\run", True),
    ("run-dir", "run", True), ("audit-log", "audit.jsonl", True), ("ledger", "budget.json", True),
])
def test_config_values_that_are_paths_are_recognised(key: str, value: str, expected: bool) -> None:
    assert _looks_like_path(key, value) is expected


@pytest.mark.parametrize("key, expected", [
    ("root-certificates", "root_certificates"), ("num_examples", "num_examples"), ("numExamples", "num_examples"),
])
def test_norm_key(key: str, expected: str) -> None:
    assert norm_key(key) == expected


@pytest.mark.parametrize("value, expected", [
    ([1, 2, 3, 4], [[1.0, 2.0], [3.0, 4.0]]),
    ([[1, 2], [3, 4]], [[1.0, 2.0], [3.0, 4.0]]),
    ([1, 2, 3], None),
    ([[1, 2], [3]], None),
    (["a", "b", "c", "d"], None),
    (None, None),
])
def test_confusion_matrix_from_flat_or_nested(value: Any, expected: Any) -> None:
    assert confusion_matrix(value) == expected
