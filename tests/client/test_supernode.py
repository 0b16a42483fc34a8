"""Tests for client/supernode.py: the SuperNode command from site.yaml, and what stops it from starting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from client.node_key import NodeKeyError, make_site_key
from client.site_config import load_site_config
from client.supernode import supernode_command
from lungmae_cli.main import main
from lungmae_core.errors import SiteConfigError


def _site(tmp_path: Path, **connection: object) -> Path:
    key, _ = make_site_key(tmp_path / "keys", "north")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    conn = {"superlink": "fl.example.org:9091", "root-certificates": "ca.crt", "auth-key": "keys/north.key",
            "node-port": 9200, **connection}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": "north"}, "connection": conn}))
    return path


def test_command_has_tls_key_node_config_and_local_port(tmp_path: Path) -> None:
    path = _site(tmp_path)
    cmd = supernode_command(path, load_site_config(path).connection)
    assert cmd[0] == "flower-supernode" and "--insecure" not in cmd
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["--superlink"] == "fl.example.org:9091"
    assert args["--root-certificates"] == str((tmp_path / "ca.crt").resolve())
    assert args["--auth-supernode-private-key"] == str((tmp_path / "keys/north.key").resolve())
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "9200")
    assert args["--node-config"] == f'site-config="{path.resolve()}"'


def test_every_missing_piece_is_listed(tmp_path: Path) -> None:
    path = _site(tmp_path, **{"root-certificates": None, "auth-key": "missing.key", "metrics-port": 9200})
    with pytest.raises(SiteConfigError) as info:
        supernode_command(path, load_site_config(path).connection)
    text = str(info.value)
    assert "1. connection: 'root-certificates' is not set" in text
    assert f"2. connection: 'auth-key' file {tmp_path / 'missing.key'} does not exist" in text
    assert "3. connection: 'metrics-port' and 'node-port' are both 9200" in text


def test_public_key_instead_of_private_is_refused(tmp_path: Path) -> None:
    path = _site(tmp_path, **{"auth-key": "keys/north.pub"})
    with pytest.raises(NodeKeyError, match="as it is a PUBLIC key"):
        supernode_command(path, load_site_config(path).connection)


def test_cli_prints_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _site(tmp_path)
    assert main(["site", "start", "--config", str(path), "--print-command"]) == 0
    out = capsys.readouterr().out
    # the launcher (bundle check, client certificate, warm ClientApp process) runs Flower's SuperNode in-process
    sock = tmp_path / "state" / "warm-clientapp" / "clientapp.sock"
    assert (f"-m client.supernode --site-config {path.resolve()} --warm-socket {sock} -- flower-supernode "
            "--superlink ") in out
    assert "--client-certificate" not in out
    assert main(["site", "start", "--config", str(path), "--print-command", "--no-warm-clientapp"]) == 0
    assert f"--site-config {path.resolve()} -- flower-supernode --superlink " in capsys.readouterr().out


def test_launcher_passes_the_client_certificate_and_refuses_half_a_pair(tmp_path: Path) -> None:
    from client.supernode import launch_command

    path = _site(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["trust"] = {"client-certificate": "north.client.pem", "client-key": "north.client.key"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SiteConfigError, match="client-certificate' file .*north.client.pem does not exist"):
        launch_command(path, load_site_config(path))
    (tmp_path / "north.client.pem").write_text("x")
    (tmp_path / "north.client.key").write_text("x")
    cmd = launch_command(path, load_site_config(path))
    assert cmd[1:3] == ["-m", "client.supernode"]
    assert cmd[cmd.index("--client-certificate") + 1] == str(tmp_path / "north.client.pem")
    assert cmd[cmd.index("--") + 1] == "flower-supernode"
    data["trust"] = {"client-certificate": "north.client.pem"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SiteConfigError, match="'client-certificate' and 'client-key' must be given together"):
        load_site_config(path)


def test_idle_pull_and_local_waits_are_capped_and_only_that() -> None:
    import time

    from flwr.supernode import start_client_internal

    from client.supernode import _shorten_supernode_waits

    original = start_client_internal.time
    try:
        _shorten_supernode_waits(0.3, 0.01)
        started = time.monotonic()
        start_client_internal.time.sleep(3)  # Flower's pause after an empty pull: a request each time
        assert 0.3 <= time.monotonic() - started < 1.0
        started = time.monotonic()
        start_client_internal.time.sleep(0.5)  # its wait for the ClientApp's reply: a look at its own state
        assert time.monotonic() - started < 0.4
        assert start_client_internal.time.monotonic() > 0  # the rest of the time module is untouched
    finally:
        start_client_internal.time = original


def test_a_missing_object_is_asked_for_again_sooner_with_the_same_patience() -> None:
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supernode import start_client_internal

    from client.supernode import _shorten_supernode_waits
    from lungmae_core.bundle import OBJECT_RETRY

    original_time, original_pull = start_client_internal.time, start_client_internal.pull_objects
    try:
        _shorten_supernode_waits(0.5)
        _shorten_supernode_waits(0.5)  # idempotent: not a partial of a partial
        bound = start_client_internal.pull_objects
        assert bound.func is pull_objects and bound.keywords == OBJECT_RETRY and OBJECT_RETRY["initial_backoff"] <= 0.1
        cap, tries = bound.keywords["backoff_cap"], bound.keywords["max_tries_per_object"]
        assert cap * tries >= 10 * 500  # Flower's default patience: 500 tries, up to 10 s apart
    finally:
        start_client_internal.time, start_client_internal.pull_objects = original_time, original_pull
