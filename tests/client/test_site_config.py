"""site.yaml: defaults, paths relative to the file, round trip, and errors naming file, key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_config import SiteConfig, load_site_config, site_config_from_mapping, write_site_config
from lungmae_core.errors import SiteConfigError

EXAMPLE = """\
site: {name: hospital-a, seed: 3}
data:
  input: dicom
  labels: ../shared/labels.csv
  cache: /var/cache/lungmae
  workers: 4
  irregular-spacing: reject
preprocess: {size: 64}
training: {device: cpu, batch-size: 1}
connection: {superlink: "fl.example.org:9092", metrics-port: 9100}
"""


def test_example_file_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir()
    path.write_text(EXAMPLE)
    cfg = load_site_config(path)
    assert cfg.site.name == "hospital-a" and cfg.site.seed == 3
    assert cfg.data.input == tmp_path / "conf" / "dicom"
    assert cfg.data.labels == tmp_path / "shared" / "labels.csv"
    assert cfg.data.cache == Path("/var/cache/lungmae")
    state = tmp_path / "conf" / "state"  # outside the cache, beside site.yaml
    assert cfg.site.state_dir == state
    assert cfg.data.secret_path() == state / "site-secret.key"
    assert cfg.data.legacy_secret_path() == Path("/var/cache/lungmae/site-secret.key")
    assert cfg.privacy.ledger == state / "privacy-ledger.json"
    assert cfg.data.series_rules().irregular_spacing == "reject"
    assert cfg.preprocess.size == 64 and cfg.preprocess.margin_mm == 20.0
    assert cfg.training.device == "cpu" and cfg.training.batch_size == 1
    assert cfg.connection.superlink == "fl.example.org:9092" and cfg.connection.metrics_port == 9100
    assert cfg.privacy.enabled is False


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    cfg = site_config_from_mapping({"site": {"name": "s1"}, "data": {"input": "in", "cache": "cache"},
                                    "preprocess": {"size": 32}}, base_dir=tmp_path)
    path = write_site_config(cfg, tmp_path / "site.yaml")
    assert "input: in\n" in path.read_text()  # written relative to the file, so the folder can move
    assert load_site_config(path) == cfg


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("")
    cfg = load_site_config(tmp_path / "site.yaml")
    state = tmp_path / "state"
    assert cfg.site.state_dir == state and cfg.privacy.ledger == state / "privacy-ledger.json"
    assert cfg.data.secret_file == state / "site-secret.key"
    defaults = SiteConfig()
    assert (cfg.training, cfg.preprocess, cfg.connection) == (defaults.training, defaults.preprocess,
                                                               defaults.connection)


def test_state_dir_of_a_mapping_without_a_file_sits_beside_its_cache(tmp_path: Path) -> None:
    cfg = site_config_from_mapping({"data": {"cache": str(tmp_path / "caches" / "north")}})
    assert cfg.site.state_dir == tmp_path / "caches" / "north.state"


def test_state_dir_is_configurable_and_never_inside_the_cache(tmp_path: Path) -> None:
    cfg = site_config_from_mapping({"site": {"state-dir": "/srv/lungmae-state"}, "data": {"cache": "cache"}},
                                   base_dir=tmp_path)
    assert cfg.site.state_dir == Path("/srv/lungmae-state")
    assert cfg.privacy.ledger == Path("/srv/lungmae-state/privacy-ledger.json")
    for mapping, key in [({"site": {"state-dir": "cache/state"}}, "site: state-dir"),
                         ({"privacy": {"ledger": "cache/l.json"}}, "privacy: ledger"),
                         ({"data": {"secret-file": "cache/k.key"}}, "data: secret-file")]:
        mapping = {**mapping, "data": {"cache": "cache", **mapping.get("data", {})}}
        with pytest.raises(SiteConfigError, match=f"s.yaml: '{key}' .* is inside the cache .*; the privacy ledger "
                                                  "and the pseudonym key must survive deleting the cache"):
            site_config_from_mapping(mapping, source="s.yaml", base_dir=tmp_path)


@pytest.mark.parametrize("mapping,message", [
    ({"dat": {}}, "s.yaml: 'dat' is not a known section; allowed sections: site, data, preprocess, training, "
                  "privacy, connection"),
    ({"data": {"workerz": 2}}, "s.yaml: 'data': 'workerz' is not a known key; allowed keys: axial-tolerance-deg, "
                               "cache, classes, input, irregular-spacing, labels"),
    ({"data": {"irregular-spacing": "fix"}}, "s.yaml: 'data': 'irregular-spacing' must be one of 'resample', "
                                             "'reject'; got 'fix'"),
    ({"data": {"workers": 0}}, "s.yaml: 'data': 'workers' must be in [1, 256]; got 0"),
    ({"data": {"spacing-tolerance": 2}}, "'spacing-tolerance' must be in (0, 1)"),
    ({"data": {"min-slices": "many"}}, "s.yaml: 'data': 'min-slices' must be an integer; got 'many'"),
    ({"site": {"name": "a b"}}, "s.yaml: 'site': 'name' must be 1-64 letters"),
    ({"preprocess": {"size": 4}}, "s.yaml: 'preprocess': preprocess size must be in [8, 1024] voxels; got 4"),
    ({"training": {"device": "gpu"}}, "'device' must be one of 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'; got 'gpu'"),
    ({"connection": {"superlink": "nohost"}}, "'superlink' must be 'host:port'"),
    ({"connection": {"node-port": 70000}}, "'node-port' must be in [1, 65535]; got 70000"),
    ({"data": []}, "s.yaml: 'data' must be a mapping of keys to values"),
])
def test_bad_values_name_file_key_and_allowed(mapping, message) -> None:
    with pytest.raises(SiteConfigError) as err:
        site_config_from_mapping(mapping, source="s.yaml")
    assert message in str(err.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match=r"Unable to read .*nope.yaml as it does not exist"):
        load_site_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("site: [\n")
    with pytest.raises(SiteConfigError, match=r"bad.yaml at line \d+, column \d+ as it is not valid YAML"):
        load_site_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(SiteConfigError, match=r"list.yaml must hold a mapping"):
        load_site_config(tmp_path / "list.yaml")
