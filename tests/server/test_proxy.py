"""Tests for server/ops/proxy.py: the nginx configuration nginx itself accepts, forwarding only Fleet routes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lungmae_cli.main import main
from lungmae_core.errors import FederationConfigError
from server.ops.proxy import FLEET_ROUTES, SITE_BLOCK_TEMPLATE, render_site_block, render_standalone
from server.ops.superlink import ServerTLS

REPO = Path(__file__).resolve().parents[2]
FLEET_CLIENT_PATHS = {"register-node", "unregister-node", *FLEET_ROUTES}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    assert main(["certs", "--out", str(out), "--server-name", "localhost", "--site", "s0"]) == 0
    return out


def _tls(pki: Path) -> ServerTLS:
    return ServerTLS(pki / "server/server.pem", pki / "server/server.key", pki / "ca/ca.crt")


def test_template_in_deploy_is_the_one_rendered() -> None:
    assert (REPO / "deploy/nginx/lungmae-fleet.conf.template").read_text() == SITE_BLOCK_TEMPLATE


def test_only_fleet_routes_of_a_supernode_are_forwarded(pki: Path) -> None:
    flwr = pytest.importorskip("flwr")
    block = render_site_block(listen="0.0.0.0:9091", upstream_port=9092, tls=_tls(pki), crl=pki / "ca/crl.pem")
    forwarded = re.search(r"location ~ \^/v1/fleet/\(([^)]*)\)\$", block).group(1).split("|")
    assert set(forwarded) == set(FLEET_ROUTES)
    # every route of Flower's Fleet client except self-registration, and nothing else
    client = (Path(flwr.__file__).parent / "supernode/fleet_http_client.py").read_text()
    used = set(re.findall(r'path="/v1/fleet/([a-z-]+)"', client))
    assert used == FLEET_CLIENT_PATHS, used
    assert "proxy_pass                    https://127.0.0.1:9092;" in block
    assert "ssl_verify_client       on;" in block and f"ssl_crl                 {pki / 'ca/crl.pem'}" in block
    assert "$ssl_client_s_dn" in block and "/v1/control" not in block.split("location / {")[0].split("server {")[1]


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx is not installed (apt-get install nginx)")
def test_nginx_accepts_the_standalone_config(pki: Path, tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    block = render_site_block(listen="127.0.0.1:19191", upstream_port=19192, tls=_tls(pki), crl=pki / "ca/crl.pem")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_standalone(block, tmp_path))
    proc = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and "test is successful" in proc.stderr, proc.stderr


def test_bad_input_is_named(pki: Path) -> None:
    with pytest.raises(FederationConfigError, match="--listen must be host:port"):
        render_site_block(listen="9091", upstream_port=1, tls=_tls(pki), crl=pki / "ca/crl.pem")
    with pytest.raises(FederationConfigError, match="revocation list .*missing.pem does not exist"):
        render_site_block(listen="0.0.0.0:9091", upstream_port=9092, tls=_tls(pki), crl=pki / "missing.pem")


def test_superlink_binds_loopback_with_the_superexec_secret(pki: Path, tmp_path: Path) -> None:
    import stat

    from server.ops.superlink import ensure_superexec_secret, superexec_command, superlink_command

    secret = ensure_superexec_secret(tmp_path / "state" / "superexec.secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 64
    assert ensure_superexec_secret(secret).read_bytes() == secret.read_bytes()
    cmd = superlink_command("fl.example.org:9092", _tls(pki), database=tmp_path / "db", superexec_secret=secret)
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["--host"] == "127.0.0.1" and args["--isolation"] == "process"
    assert args["--superexec-auth-secret-file"] == str(secret)
    exe = superexec_command("fl.example.org:9092", _tls(pki), secret_file=secret, parent_pid=7)
    assert exe[exe.index("--runtime-api-address") + 1] == "127.0.0.1:9092"
    assert exe[exe.index("--superexec-auth-secret-file") + 1] == str(secret)
    secret.chmod(0o644)
    with pytest.raises(FederationConfigError, match="readable by other users"):
        ensure_superexec_secret(secret)
