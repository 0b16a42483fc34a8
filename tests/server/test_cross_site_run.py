"""The cross-site evaluation matrix end to end on an in-process grid: three prepared sites, real ClientApps.

One site does not share its local model (still scores the others' and the global one), one withholds its
counts (policy min-count above its test split); a hostile run sends a garbage local model (dropped by the
update checks, its row null with the reason) and a site whose evaluation budget runs out mid-matrix (that
cell null with the policy's reason). The run completes in every case.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from client.client_app import make_client_app
from client.site_config import load_site_config, write_site_config
from server.cross_site import read_cross_site
from server.cross_site_step import SPOOL_PREFIX
from server.federation_config import federation_from_mapping
from server.report.cross_site import cross_site_section
from server.runner import FederationRunner
from tests.federated_helpers import InProcessGrid, ServerKilled, prepared_sites, replace_first_array, with_nan

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def base_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return prepared_sites(tmp_path_factory.mktemp("xsites"), sites=3)


def _site_copies(base: list[Path], root: Path, policies: dict[int, dict]) -> list[Path]:
    """The prepared sites with their policy changed (same caches, new site.yaml files)."""
    out = []
    for i, path in enumerate(base):
        cfg = load_site_config(path)
        cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **policies.get(i, {})))
        out.append(Path(write_site_config(cfg, root / f"site{i}" / "site.yaml")))
    return out


def _cfg(run_dir: Path) -> object:
    return federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": 1, "local-epochs": 1, "min-sites": 1},
                   "finetune": {"rounds": 1, "local-epochs": 1, "min-sites": 1}},
        "cross-site": {"local-epochs": 1}, "run-dir": str(run_dir), "round-timeout-s": 5}, source="test")


def _run(sites: list[Path], run_dir: Path, tamper=None) -> dict:
    grid = InProcessGrid(make_client_app(sites), [{"partition-id": i} for i in range(len(sites))], tamper=tamper)
    FederationRunner(_cfg(run_dir), grid).run()
    return json.loads((run_dir / "metrics.json").read_text())


def _test_counts(summary: dict) -> dict[str, int]:
    return {s: m["num_examples"] for s, m in summary["final"]["sites"].items()}


def test_matrix_with_a_non_sharing_site_and_suppressed_counts(base_sites: list[Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sites = _site_copies(base_sites, tmp_path, {0: {"min_count": 100}, 2: {"share_local_model": False}})
    waiting: list[list[str]] = []  # the local models on disk each time one is read back
    real_load = torch.load

    def load(path, *args, **kwargs):
        if Path(path).parent.name.startswith(SPOOL_PREFIX):
            waiting.append(sorted(f.name for f in Path(path).parent.iterdir()))
            assert (Path(path).stat().st_mode & 0o777) == 0o600
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    summary = _run(sites, tmp_path / "run")
    assert summary["status"] == "completed"
    # both local models waited on disk and were read back one at a time; the folder is gone afterwards
    assert waiting == [["local-0000.pt", "local-0001.pt"], ["local-0001.pt"]] or \
        waiting == [["local-0000.pt", "local-0001.pt"], ["local-0000.pt"]]
    assert not list((tmp_path / "run").glob(SPOOL_PREFIX + "*"))
    raw = summary["final"]["cross_site"]
    matrix, why = read_cross_site(raw)
    assert matrix is not None, why
    assert matrix.models == ("global", "site0", "site1") and matrix.data_sites == ("site0", "site1", "site2")
    assert set(raw["notes"]["not_shared"]) == {"site2"} and "share-local-model" in raw["notes"]["not_shared"]["site2"]
    assert raw["notes"]["models"] == {} and raw["notes"]["cells"] == []
    assert set(raw["local_training"]) == {"site0", "site1"}
    counts = _test_counts(summary)
    for i, model in enumerate(matrix.models):
        # every model scored at every site, the non-sharing site2 included
        assert all(v is not None for v in matrix.metrics["accuracy"][i]), model
        # site0's test split is below its own minimum (100): its count is withheld, the others' are shown
        assert matrix.suppressed[i] == [True, False, False]
        assert matrix.num_examples[i] == [None, counts["site1"], counts["site2"]]
    assert matrix.min_count == {"site0": 100, "site1": 1, "site2": 1}
    # the global row is the final evaluation's figures
    assert matrix.cell("accuracy", "global", "site1") == summary["final"]["sites"]["site1"]["accuracy"]
    html = cross_site_section(summary)
    assert 'id="cross-site-matrix"' in html and "site0 (local)" in html and "site2 (local)" not in html
    assert "&lt; 100" in html and "does not share" in html


def test_garbage_local_model_and_exhausted_evaluation_budget(base_sites: list[Path], tmp_path: Path) -> None:
    # site2 serves 3 evaluations in this plan before the matrix (pretrain val, finetune val, final test):
    # with a limit of 4 it scores one local model and refuses the next
    sites = _site_copies(base_sites, tmp_path, {2: {"max_evaluations_per_run": 4}})
    sent: dict[int, str] = {}

    class Spy(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for m in messages:
                sent[m.metadata.dst_node_id] = str(m.content["config"]["phase"]) + "/" + m.metadata.message_type
            return super().send_and_receive(messages, timeout=timeout)

    def tamper(node: int, reply: Message) -> Message:
        if sent.get(node) == "cross-site/train" and node == 102 and not reply.has_error():
            reply.content["arrays"] = replace_first_array(reply.content["arrays"], with_nan)
        return reply

    cfg_sites = sites
    run_dir = tmp_path / "run"
    cfg = federation_from_mapping({
        "model": {"name": "tiny", "overrides": {"img-size": 32, "depth": 2, "decoder-depth": 1}},
        "phases": {"pretrain": {"rounds": 1, "local-epochs": 1, "min-sites": 1},
                   "finetune": {"rounds": 1, "local-epochs": 1, "min-sites": 1}},
        "run-dir": str(run_dir), "round-timeout-s": 5}, source="test")
    grid = Spy(make_client_app(cfg_sites), [{"partition-id": i} for i in range(3)], tamper=tamper)
    FederationRunner(cfg, grid).run()
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed"
    raw = summary["final"]["cross_site"]
    matrix, why = read_cross_site(raw)
    assert matrix is not None, why
    assert matrix.models == ("global", "site0", "site1", "site2")
    row = matrix.models.index("site1")
    assert all(v is None for v in matrix.metrics["accuracy"][row]) and matrix.num_examples[row] == [None] * 3
    assert "finite" in raw["notes"]["models"]["site1"]
    # site2 scored the first local model it was sent (site0's), then refused by its evaluation limit
    assert matrix.cell("accuracy", "site0", "site2") is not None
    assert matrix.cell("accuracy", "site2", "site2") is None
    refused = [c for c in raw["notes"]["cells"] if c["data_site"] == "site2"]
    assert [c["model"] for c in refused] == ["site2"]
    assert "policy.max-evaluations-per-run" in refused[0]["reason"]
    assert matrix.cell("accuracy", "site2", "site0") is not None  # the other sites scored site2's model
    html = cross_site_section(summary)
    assert "finite" in html and "max-evaluations-per-run" in html


def test_a_server_killed_in_the_cross_site_step_resumes_it(base_sites: list[Path], tmp_path: Path) -> None:
    """Exchanges: query, pretrain train + eval, finetune train + eval, final eval, cross-site train, then the
    first local model's evaluation: the server dies there, and the restarted one reruns only the cross-site
    step (new query of the sites it no longer knows, local models again), keeping the final evaluation."""
    sites = base_sites[:2]
    grid = InProcessGrid(make_client_app(sites), [{"partition-id": i} for i in range(2)], kill_after=8)
    with pytest.raises(ServerKilled):
        FederationRunner(_cfg(tmp_path / "run"), grid).run()
    before = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert before["cross_site"]["models"] == ["global"]  # the final step's matrix: the global row only
    # a SIGKILLed server leaves its spools (a raised exception does not): the restarted one removes them
    assert not list((tmp_path / "run").glob(SPOOL_PREFIX + "*"))
    for stale in (tmp_path / "run" / (SPOOL_PREFIX + "x1"), tmp_path / "run" / "aggregation-spool-y2"):
        stale.mkdir()
        (stale / "local-0000.pt").write_bytes(b"weights")
    grid2 = InProcessGrid(make_client_app(sites), [{"partition-id": i} for i in range(2)])
    FederationRunner(_cfg(tmp_path / "run"), grid2).run()
    kinds = [(m.metadata.message_type, str(m.content["config"]["phase"])) for m in grid2.sent]
    assert set(kinds) == {("query", "cross-site"), ("train", "cross-site"), ("evaluate", "cross-site")}
    assert not list((tmp_path / "run").glob(SPOOL_PREFIX + "*")) and not list((tmp_path / "run").glob("aggregation-*"))
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert final["sites"] == before["sites"]
    matrix, why = read_cross_site(final["cross_site"])
    assert matrix is not None, why
    assert matrix.models == ("global", "site0", "site1")
    assert all(v is not None for row in matrix.metrics["accuracy"] for v in row)
