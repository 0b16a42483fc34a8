"""Checks of the deploy bundle with the real tools: promtool (config, rules, rule unit tests, dashboard
queries), systemd-analyze (unit files) and the compose file's references."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM = DEPLOY / "prometheus"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus / systemd)")
    return path


def _run(*cmd: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("config", ["prometheus.yml", "compose-prometheus.yml", "site-prometheus.yml"])
def test_prometheus_config_is_valid(config: str) -> None:
    out = _run(_tool("promtool"), "check", "config", PROM / config).stdout
    assert "SUCCESS: 1 rule files found" in out


def test_alert_rules_are_valid_and_fire_as_specified() -> None:
    promtool = _tool("promtool")
    assert "SUCCESS: 6 rules found" in _run(promtool, "check", "rules", PROM / "alerts.yml").stdout
    _run(promtool, "test", "rules", "alerts_test.yml", cwd=PROM)
    names = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"LungMAESiteDown", "LungMAERoundStalled", "LungMAEUpdateRejected",
            "LungMAEPrivacyBudgetNearlySpent"} <= names


def test_alert_rule_tests_can_fail(tmp_path: Path) -> None:
    """The rule unit tests are real: an alert expected at the wrong time makes promtool fail."""
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    text = (PROM / "alerts_test.yml").read_text().replace("eval_time: 15m\n        alertname: LungMAESiteDown",
                                                          "eval_time: 35m\n        alertname: LungMAESiteDown")
    (tmp_path / "alerts_test.yml").write_text(text)
    proc = subprocess.run([_tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "LungMAESiteDown" in proc.stdout + proc.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana/lungmae-federation.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    _run(_tool("promtool"), "check", "rules", tmp_path / "dashboard_rules.yml")


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    """Every lungmae_* name in the bundle is one FederationMetrics exports (a typo would alert on nothing)."""
    import re

    from server.prometheus import FederationMetrics

    metrics = FederationMetrics(None)
    metrics.round_finished("pretrain", 1, duration_s=1, sampled=1, replied=1, failed=0, rejected={"norm": 1},
                           train_metrics={"loss": 1.0}, eval_metrics={"loss": 1.0})
    metrics.site_epsilon("a", 1.0, 2.0)
    exported = set(re.findall(r"^(lungmae_[a-z_]+)", metrics.render(), re.M))
    text = (PROM / "alerts.yml").read_text() + (DEPLOY / "grafana/lungmae-federation.json").read_text()
    used = set(re.findall(r"lungmae_[a-z_]+", text)) - {"lungmae_federation"}
    assert used and used <= exported, used - exported


def test_site_alerts_use_only_site_metrics(tmp_path: Path) -> None:
    import re

    import yaml as _yaml

    from client.site_config import load_site_config
    from client.site_metrics import SiteMetrics

    (tmp_path / "site.yaml").write_text(_yaml.safe_dump({
        "data": {"cache": "cache"}, "training": {"device": "cpu"},
        "privacy": {"enabled": True, "epsilon": 3.0, "noise-multiplier": 1.0}}))
    exported = set(re.findall(r"^(lungmae_[a-z_]+)", SiteMetrics(load_site_config(tmp_path / "site.yaml")).render(),
                              re.M))
    used = set(re.findall(r"lungmae_[a-z_]+", (PROM / "site-alerts.yml").read_text())) - {"lungmae_site"}
    assert used and used <= exported, used - exported


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    lungmae = str(Path(sys.executable).parent / "lungmae")  # next to this Python, venv active or not
    if not Path(lungmae).exists():
        pytest.skip("the lungmae console script is not installed")
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/lungmae/venv/bin/lungmae", lungmae)
        text = text.replace("User=lungmae", "User=root").replace("Group=lungmae", "Group=root")
        (tmp_path / unit.name).write_text(text)
    proc = subprocess.run([analyze, "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                          capture_output=True, text=True, timeout=120, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "lungmae-" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_compose_file_references_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"coordinator", "site0", "site1", "runner", "prometheus"} <= set(services)
    assert services["coordinator"]["command"][:2] == ["server", "start"]
    assert services["site0"]["command"][:2] == ["site", "start"]
    for volume in services["prometheus"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    assert (DEPLOY / compose["x-image"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()
    demo = yaml.safe_load((DEPLOY / "demo/federation.yaml").read_text())
    from server.federation_config import federation_from_mapping

    assert federation_from_mapping(demo).server.metrics_port == 9464
    # the demo's sites go through the proxy, as in production: the SuperLink binds loopback, never --listen
    coordinator = services["coordinator"]["command"]
    assert "--listen" not in coordinator and "--proxy-listen" in coordinator
    proxy_port = coordinator[coordinator.index("--proxy-listen") + 1].rsplit(":", 1)[1]
    assert federation_from_mapping(demo).server.superlink.startswith("127.0.0.1:")
    init = (DEPLOY / "demo/init.sh").read_text()
    assert f'"superlink": "coordinator:{proxy_port}"' in init
    assert '"client-certificate"' in init and '"client-key"' in init
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "FLWR_TELEMETRY_ENABLED=0" in dockerfile
