"""site.yaml ``policy:``: defaults, validation with clear errors, and `lungmae site policy`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.policy import PolicyRefusal, Usage, check_request, model_parameters
from client.site_config import PolicySection, load_site_config, site_config_from_mapping
from lungmae_cli.main import main
from lungmae_core.config import model_config, to_mapping
from lungmae_core.contract import RoundConfig
from lungmae_core.errors import SiteConfigError


def test_safe_defaults() -> None:
    policy = site_config_from_mapping({}).policy
    assert policy.evaluation_splits == ("val", "test") and "train" not in policy.evaluation_splits
    assert policy.min_count == 10 and policy.allowed_models == ("tiny", "paper-p16", "paper-p8", "paper-256")
    assert policy.max_parameters >= model_parameters(RoundConfig(
        phase="pretrain", server_round=1, model_name="paper-256", model_config=to_mapping(model_config("paper-256"))))


@pytest.mark.parametrize("policy, message", [
    ({"evaluation-splits": ["val", "everything"]}, "'evaluation-splits' must be among train, val, test"),
    ({"min-count": 0}, "'min-count' must be at least 1; got 0"),
    ({"max-parameters": -1}, "'max-parameters' must be at least 1"),
    ({"allowed-models": []}, "'allowed-models' must name at least one model config"),
    ({"max-evals": 3}, "max-evals"),
])
def test_bad_policy_is_a_clear_error(policy: dict, message: str) -> None:
    with pytest.raises(SiteConfigError) as info:
        site_config_from_mapping({"policy": policy}, source="site.yaml")
    assert message in str(info.value)


def test_check_request_counts_only_what_it_allows() -> None:
    cfg = RoundConfig(phase="finetune", server_round=1, model_name="tiny",
                      model_config=to_mapping(model_config("tiny", img_size=32, depth=1)), split="test")
    usage = Usage()
    policy = PolicySection(max_evaluations_per_run=1, evaluation_splits=("test",))
    check_request(policy, "evaluate", cfg, dp_enabled=False, usage=usage)
    assert usage == Usage(evaluations=1)
    with pytest.raises(PolicyRefusal) as info:
        check_request(policy, "evaluate", cfg, dp_enabled=False, usage=usage)
    assert info.value.key == "policy.max-evaluations-per-run" and usage == Usage(evaluations=1)


def test_cross_site_local_model_only_with_consent() -> None:
    """A cross-site train request (a local model to share) is refused unless policy share-local-model is on;
    evaluating the others' models stays allowed, and counts against max-evaluations-per-run."""
    cfg = RoundConfig(phase="cross-site", server_round=0, model_name="tiny",
                      model_config=to_mapping(model_config("tiny", img_size=32, depth=1)), split="test")
    assert site_config_from_mapping({}).policy.share_local_model is False
    usage = Usage()
    with pytest.raises(PolicyRefusal) as info:
        check_request(PolicySection(), "train", cfg, dp_enabled=False, usage=usage)
    assert info.value.key == "policy.share-local-model" and usage == Usage()
    check_request(PolicySection(), "evaluate", cfg, dp_enabled=False, usage=usage)
    shared = site_config_from_mapping({"policy": {"share-local-model": True}}).policy
    check_request(shared, "train", cfg, dp_enabled=False, usage=usage)
    assert usage == Usage(train_rounds=1, evaluations=1)


def test_cli_prints_the_effective_policy(tmp_path: Path, capsys) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("site: {name: hospital-a}\nprivacy: {enabled: true, epsilon: 8, noise-multiplier: 1.0}\n"
                    "policy: {evaluation-splits: [test], min-count: 20}\n")
    assert main(["site", "policy", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Policy of site 'hospital-a'" in out and "evaluation-splits        test" in out
    assert "min-count                20" in out and "max-parameters           300,000,000" in out
    assert "no training loss or accuracy" in out
    assert main(["site", "policy", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["evaluation-splits"] == ["test"] and data["max-evaluations-per-run"] == 100
    assert load_site_config(path).policy.min_count == 20
    assert main(["site", "policy", "--config", str(tmp_path / "missing.yaml")]) == 2
