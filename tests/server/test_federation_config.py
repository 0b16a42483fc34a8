"""federation.yaml: defaults, the example file, run-config overrides, hashing and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungmae_core.errors import FederationConfigError
from server.federation_config import (
    FederationConfig,
    config_hash,
    federation_from_mapping,
    federation_from_run_config,
    load_federation_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "federation.example.yaml"


def test_example_file_loads_and_resolves_run_dir() -> None:
    cfg = load_federation_config(EXAMPLE)
    assert cfg.run_dir.is_absolute() and cfg.run_dir.parent == EXAMPLE.parent.resolve() / "runs"
    assert cfg.num_classes == 4 and cfg.compression == "fp16"


def test_model_shorthand_and_partial_phase() -> None:
    cfg = federation_from_mapping({"model": "tiny", "phases": {"finetune": {"rounds": 5, "mode": "linear-probe"}}})
    assert cfg.model.name == "tiny" and cfg.phases.finetune.rounds == 5
    assert cfg.phases.finetune.mode == "linear-probe"


@pytest.mark.parametrize("mapping, message", [
    ({"phases": {"pretrain": {"round": 2}}},
     "fed.yaml: 'phases': 'pretrain': 'round' is not a known key; allowed keys:"),
    ({"strategy": {"name": "krum"}}, "'name' must be one of 'fedavg', 'fedprox', 'trimmed-mean', 'median'; got 'krum'"),
    ({"strategy": {"name": "fedprox"}}, "mu must be > 0 when the strategy is fedprox"),
    ({"compression": "bf16"}, "'compression' must be one of 'fp32', 'fp16', 'int8', 'topk'"),
    ({"phases": {"finetune": {"fraction": 1.5}}}, "fraction must be in (0, 1]; got 1.5"),
    ({"phases": {"pretrain": {"rounds": 0}, "finetune": {"rounds": 0}}}, "at least one round"),
    ({"classes": ["a"]}, "classes must have 2..64 names; got 1"),
    ({"update-checks": {"max-norm": 0}}, "max-norm must be > 0; got 0.0"),
    ({"update-checks": {"max-site-share": 0}}, "max-site-share must be in (0, 1]; got 0.0"),
    ({"sites": {"hospital": "a"}}, "sites: keys must be node ids (integers); got 'hospital'"),
    ({"sites": {1: "a", 2: "a"}}, "sites: two nodes have the same site name"),
    ({"sites": {1: "a b"}}, "sites: 1: a site name is 1-64 letters"),
    ({"model": {"name": "tiny", "pooling": "max"}}, "'pooling' must be one of 'lung', 'mean', 'cls'"),
    ({"round-timeout-s": "soon"}, "'round-timeout-s' must be a number; got 'soon'"),
])
def test_errors_name_file_and_key(mapping: dict, message: str) -> None:
    with pytest.raises(FederationConfigError) as info:
        federation_from_mapping(mapping, source="fed.yaml")
    assert message in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(FederationConfigError, match="does not exist"):
        load_federation_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases: [1, 2\n")
    with pytest.raises(FederationConfigError, match="bad.yaml at line"):
        load_federation_config(bad)


def test_run_config_overrides(tmp_path: Path) -> None:
    cfg = federation_from_run_config({"federation-config": str(EXAMPLE), "run-dir": str(tmp_path),
                                      "pretrain-rounds": 0, "finetune-rounds": -1})
    base = load_federation_config(EXAMPLE)
    assert cfg.run_dir == tmp_path and cfg.phases.pretrain.rounds == 0
    assert cfg.phases.finetune == base.phases.finetune
    with pytest.raises(FederationConfigError, match="'pretrain-rounds' must be an integer; got 'x'"):
        federation_from_run_config({"pretrain-rounds": "x"})


def test_hash_ignores_hosting_but_not_science(tmp_path: Path) -> None:
    a = FederationConfig()
    assert config_hash(a) == config_hash(federation_from_mapping({"run-dir": str(tmp_path), "round-timeout-s": 5}))
    assert config_hash(a) != config_hash(federation_from_mapping({"seed": 1}))


def test_class_list_site_names_and_share_cap() -> None:
    cfg = federation_from_mapping({"classes": ["uip", "nsip", "hp", "sarcoidosis", "other"],
                                   "sites": {"1744": "hospital-a", 9: "hospital-b"}, "model": {"pooling": "cls"}})
    assert cfg.num_classes == 5 and cfg.site_names == {1744: "hospital-a", 9: "hospital-b"}
    assert cfg.update_checks.max_site_share == 0.5 and cfg.update_checks.max_reply_bytes == 0
    assert cfg.model.pooling == "cls"
    assert federation_from_mapping({}).classes == ("normal", "ggo", "fibrosis", "emphysema")
    # the node -> name mapping is hosting, not science: it does not change the config hash
    assert config_hash(cfg) == config_hash(federation_from_mapping({
        "classes": ["uip", "nsip", "hp", "sarcoidosis", "other"], "model": {"pooling": "cls"}}))
