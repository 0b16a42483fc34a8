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
def _torch_threads() -> None:
    """Two cores here: keep torch from oversubscribing when tests run beside Ray or Flower processes."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
