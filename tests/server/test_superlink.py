"""Tests for server/ops/superlink.py: the SuperLink command from federation.yaml and the Flower CLI connection."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli
import yaml

from lungmae_cli.main import main
from lungmae_core.errors import FederationConfigError
from server.federation_config import load_federation_config
from server.ops.superlink import ServerTLS, split_address, superlink_command, write_connection


def _federation(tmp_path: Path, **server: str) -> Path:
    for name in ("server.pem", "server.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    section = {"superlink": "0.0.0.0:9091", "certificate": "server.pem", "private-key": "server.key",
               "root-certificates": "ca.crt", **server}
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({"run-dir": "runs/x", "server": section}))
    return path


def test_command_enables_tls_auth_and_persistent_state(tmp_path: Path) -> None:
    path = _federation(tmp_path)
    cfg = load_federation_config(path)
    tls = ServerTLS.from_section(cfg.server, base_dir=tmp_path)
    cmd = superlink_command(cfg.server.superlink, tls, database=tmp_path / "state/db.sqlite")
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert args["--ssl-certfile"] == str((tmp_path / "server.pem").resolve())
    assert args["--database"] == str((tmp_path / "state/db.sqlite").resolve())
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "9091")  # loopback whatever the configured host
    assert (tmp_path / "state").is_dir()


def test_missing_tls_files_are_listed_with_the_fix(tmp_path: Path) -> None:
    path = _federation(tmp_path, **{"certificate": "", "private-key": "nope.key"})
    cfg = load_federation_config(path)
    with pytest.raises(FederationConfigError) as info:
        ServerTLS.from_section(cfg.server, base_dir=tmp_path)
    text = str(info.value)
    assert "1. server: 'certificate' is not set" in text
    assert f"2. server: 'private-key' file {tmp_path / 'nope.key'} does not exist" in text
    assert "lungmae certs --out pki --server-name" in text


@pytest.mark.parametrize("address", ["9091", "https://fl.org:9091", "fl.org:99999", "fl org:1"])
def test_bad_address(address: str) -> None:
    with pytest.raises(FederationConfigError, match="must be host:port"):
        split_address(address)


def test_connection_is_added_and_others_kept(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    path = write_connection("127.0.0.1:9091", tmp_path / "ca.crt", home=tmp_path)
    data = tomli.loads(path.read_text())
    assert data["superlink"]["default"] == "local" and data["superlink"]["local"]["address"] == ":local:"
    assert data["superlink"]["lungmae"] == {"address": "127.0.0.1:9091",
                                            "root-certificates": str((tmp_path / "ca.crt").resolve())}


def test_cli_prints_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _federation(tmp_path)
    assert main(["server", "start", "--config", str(path), "--print-command"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flower-superlink --ssl-certfile") and f"{tmp_path}/runs/x/superlink.db" in out
