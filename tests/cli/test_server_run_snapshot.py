"""`lungmae server run` submits a snapshot of exactly the files it built and signed, not the live app directory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from lungmae_cli.server_run import snapshot_app
from lungmae_core.errors import LungMAEError

REPO = Path(__file__).resolve().parents[2]


def _copy_of_the_app(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_an_edit_after_signing_does_not_reach_the_sites(tmp_path: Path) -> None:
    app = _copy_of_the_app(tmp_path / "app")
    snapshot, fab = snapshot_app(app, tmp_path / "snapshot")
    assert fab == build_fab_from_disk(app)  # what was signed is the app as it was
    (app / "server" / "server_app.py").write_text("raise SystemExit('edited after signing')\n")
    assert build_fab_from_disk(app) != fab
    assert build_fab_from_disk(snapshot) == fab  # what every (re)submission packs is still the signed bundle


def test_a_bundle_that_does_not_rebuild_the_same_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.cli.build as build

    app = _copy_of_the_app(tmp_path / "app")
    real = build.build_fab_from_disk
    calls = iter([0, 1])
    monkeypatch.setattr(build, "build_fab_from_disk", lambda path: real(path) + bytes([next(calls)]))
    with pytest.raises(LungMAEError, match="does not rebuild to the same bytes"):
        snapshot_app(app, tmp_path / "snapshot")
