"""Shared fixtures: deterministic seeds, quiet Flower, and temporary FLWR_HOME for every test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(autouse=True, scope="session")
def _flwr_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep Flower's config, keys and local state out of the user's home directory."""
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """One torch thread per test: the models in tests are miniatures, where a second thread costs more than it
    saves, and on two shared cores (beside Ray or Flower processes) oversubscription made them ~10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def flower_task_identity() -> None:
    """Let tests build Flower instruction messages outside a runtime (flwr 1.42 raises without a task id)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Two small prepared synthetic sites plus one whose cache is missing (site.yaml paths)."""
    from tests.federated_helpers import broken_site, prepared_sites

    root = tmp_path_factory.mktemp("sites")
    return prepared_sites(root) + [broken_site(root)]
