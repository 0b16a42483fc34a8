"""`lungmae simulate --site ...`: the federation over prepared site caches.

The fast tests check the errors raised before Ray starts (missing, stale and unlabelled caches, each naming the
site and the fix). The slow one runs the built-in default and the same federation over sites written by
``lungmae synth`` and prepared by ``lungmae site prepare`` (with their own, different site secrets) and
compares the results.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lungmae_cli.main import main

ROOT = Path(__file__).resolve().parents[2]
# Small enough for two shared cores: 2 sites x 6 scans of 32 x 48 x 48 voxels, a 32^3 two-block model.
SYNTH = ["--scans-per-site", "6", "--seed", "3", "--slices", "32", "--matrix", "48"]
FEDERATION = ("model: {name: tiny, overrides: {img-size: 32, depth: 2, decoder-depth: 1}}\n"
              "phases:\n"
              "  pretrain: {rounds: 1, local-epochs: 1, min-sites: 2}\n"
              "  finetune: {rounds: 1, local-epochs: 1, min-sites: 2}\n"
              "seed: 3\n")


def _synth(out: Path, *extra: str, sites: int = 1) -> list[Path]:
    assert main(["synth", "--out", str(out), "--sites", str(sites), *SYNTH, "--preprocess-size", "32",
                 "--workers", "1", *extra]) == 0
    return [out / f"site{i}" / "site.yaml" for i in range(sites)]


def _prepare(config: Path) -> None:
    assert main(["site", "prepare", "--config", str(config), "--workers", "1", "--no-progress"]) == 0


def _simulate_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *configs: Path) -> str:
    args = ["simulate", "--workdir", str(tmp_path / "w"), "--no-report"]
    for config in configs:
        args += ["--site", str(config)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (tmp_path / "w" / "run").exists()  # nothing started
    return err


def test_missing_cache_names_the_site_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (config,) = _synth(tmp_path / "sites")
    err = _simulate_error(capsys, tmp_path, config)
    assert "site 'site0'" in err and str(config) in err and "has no prepared cache" in err
    assert f"run `lungmae site prepare --config {config}`" in err


def test_duplicate_incomplete_stale_and_unlabelled_caches_are_refused(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (labelled,) = _synth(tmp_path / "a")
    _prepare(labelled)
    err = _simulate_error(capsys, tmp_path, labelled, labelled)
    assert "are both named 'site0'" in err
    sample = next((labelled.parent / "cache" / "samples").glob("*.npz"))
    sample.rename(sample.with_suffix(".bak"))
    err = _simulate_error(capsys, tmp_path, labelled)
    assert "site 'site0'" in err and "1 of " in err and "samples are missing" in err
    sample.with_suffix(".bak").rename(sample)
    # The site.yaml now asks for another preprocessing than the cache was built with.
    text = labelled.read_text()
    assert "size: 32" in text
    labelled.write_text(text.replace("size: 32", "size: 48"))
    err = _simulate_error(capsys, tmp_path, labelled)
    assert "site 'site0'" in err and "is stale" in err and f"lungmae site prepare --config {labelled}` again" in err

    (unlabelled,) = _synth(tmp_path / "b", "--labelled-fraction", "0")
    _prepare(unlabelled)
    err = _simulate_error(capsys, tmp_path, unlabelled)
    assert "site 'site0'" in err and "cannot fine-tune" in err and "no labelled scan" in err


def test_a_missing_site_yaml_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _simulate_error(capsys, tmp_path, tmp_path / "nowhere" / "site.yaml")
    assert str(tmp_path / "nowhere" / "site.yaml") in err and "does not exist" in err


def _cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "lungmae_cli.main", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _numbers(value: object, where: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path (durations, timestamps and byte counts left out)."""
    skip = ("duration", "time", "seconds", "started", "finished", "bytes", "wall")
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            if not any(s in str(k) for s in skip):
                out.update(_numbers(v, f"{where}.{k}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_numbers(v, f"{where}[{i}]"))
        return out
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {}
    return {where: float(value)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulate_over_synth_sites_matches_the_built_in_default(tmp_path: Path) -> None:
    fed = tmp_path / "federation.yaml"
    fed.write_text(FEDERATION)
    # The built-in way: synthetic hospitals, prepared, federated, all in one command.
    _cli("simulate", "--sites", "2", *SYNTH, "--workdir", str(tmp_path / "default"), "--federation-config",
         str(fed), "--no-report", cwd=tmp_path)
    # The researcher's way: `lungmae synth`, `lungmae site prepare` per site (each makes its own site secret),
    # then `lungmae simulate --site ...`.
    _cli("synth", "--out", str(tmp_path / "mine"), "--sites", "2", *SYNTH, "--preprocess-size", "32",
         cwd=tmp_path)
    configs = [tmp_path / "mine" / f"site{i}" / "site.yaml" for i in range(2)]
    for config in configs:
        _cli("site", "prepare", "--config", str(config), "--no-progress", cwd=tmp_path)
    _cli("simulate", *(a for c in configs for a in ("--site", str(c))), "--workdir", str(tmp_path / "sites"),
         "--federation-config", str(fed), "--no-report", cwd=tmp_path)

    secrets = [(tmp_path / d / "site0" / "state" / "site-secret.key").read_text() for d in ("default/sites", "mine")]
    assert secrets[0] != secrets[1]  # different pseudonyms: the splits and sample order must not depend on them
    a = json.loads((tmp_path / "default" / "run" / "metrics.json").read_text())
    b = json.loads((tmp_path / "sites" / "run" / "metrics.json").read_text())
    assert a["status"] == b["status"] == "completed"
    assert set(a["final"]["sites"]) == set(b["final"]["sites"]) == {"site0", "site1"}
    rounds = [[json.loads(x) for x in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
              for d in ("default", "sites")]
    left = _numbers({"final": a["final"], "sites": a.get("sites"), "rounds": rounds[0]})
    right = _numbers({"final": b["final"], "sites": b.get("sites"), "rounds": rounds[1]})
    assert left.keys() == right.keys()
    # Accuracy, not balanced accuracy: the latter is undefined on 2 test scans.
    assert any("final.pooled.accuracy" in k for k in left) and any("loss" in k for k in left)
    differ = {k: (left[k], right[k]) for k in left
              if not math.isclose(left[k], right[k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not differ, differ


@pytest.mark.parametrize("sites, cores, slots", [(3, 2, 3), (1, 2, 2), (2, 2, 2), (10, 2, 4), (3, 16, 16), (5, 1, 2)])
def test_every_site_gets_a_ray_slot_up_to_twice_the_cores(sites: int, cores: int, slots: int) -> None:
    """3 sites on 2 cores train at once (not two, then one alone beside an idle core); never under the cores."""
    from lungmae_cli.simulate import ray_slots

    assert ray_slots(sites, cores) == slots
