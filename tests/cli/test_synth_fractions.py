"""`lungmae synth` / `simulate`: a labelled fraction per site and hospitals without any label."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

from lungmae_cli.synth import parse_fractions, site_fractions, write_synthetic_sites
from lungmae_core.errors import ConfigError


def test_fractions_per_site_then_zero_for_the_unlabelled_sites():
    assert site_fractions(0.5, 3) == [0.5, 0.5, 0.5]
    assert site_fractions((1.0, 0.25), 2, unlabelled_sites=2) == [1.0, 0.25, 0.0, 0.0]
    assert parse_fractions("1,0.25") == (1.0, 0.25)
    with pytest.raises(ConfigError, match="one value or one per site"):
        site_fractions((1.0, 0.5), 3)
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        site_fractions(1.5, 1)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
        parse_fractions("half")


def _labelled(root: Path) -> int:
    with (root / "labels.csv").open() as f:
        return sum(1 for _ in csv.DictReader(f))


def test_unlabelled_sites_get_an_empty_labels_csv(tmp_path: Path):
    paths = write_synthetic_sites(tmp_path, sites=2, scans_per_site=2, shape=(16, 48, 48),
                                  labelled_fraction=(1.0, 0.5), unlabelled_sites=1, workers=1)
    assert [p.parent.name for p in paths] == ["site0", "site1", "site2"]
    assert [_labelled(p.parent) for p in paths] == [2, 1, 0]
