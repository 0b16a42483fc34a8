"""Tests for server/certs.py and `lungmae certs`: a CA, a server certificate OpenSSL accepts, site keys."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from lungmae_cli.main import main
from server.certs import CertificateError, certificate_summary, make_ca, make_server_certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    assert main(["certs", "--out", str(out), "--server-name", "fl.example.org", "--server-ip", "10.0.0.5",
                 "--site", "hospital-a", "--site", "hospital-b"]) == 0
    return out


def test_server_certificate_verifies_against_ca_and_names_hosts(pki: Path) -> None:
    proc = subprocess.run(["openssl", "verify", "-CAfile", pki / "ca/ca.crt", pki / "server/server.pem"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    info = certificate_summary(pki / "server/server.pem")
    assert info["sans"] == ["fl.example.org", "localhost", "10.0.0.5", "127.0.0.1"]  # loopback always added
    assert (pki / "server/ca.crt").read_bytes() == (pki / "ca/ca.crt").read_bytes()


def test_private_keys_are_owner_only(pki: Path) -> None:
    for key in ("ca/ca.key", "server/server.key", "sites/hospital-a/hospital-a.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600, key
    assert (pki / "sites/hospital-b/ca.crt").exists()


def test_site_public_key_is_openssh_ecdsa_384(pki: Path) -> None:
    proc = subprocess.run(["ssh-keygen", "-l", "-f", pki / "sites/hospital-a/hospital-a.pub"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("384 ") and "(ECDSA)" in proc.stdout


def test_rerun_keeps_existing_files_and_prints_register_commands(pki: Path, capsys: pytest.CaptureFixture) -> None:
    before = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file()}
    assert main(["certs", "--out", str(pki), "--site", "hospital-a", "--site", "hospital-c"]) == 0
    assert all(p.read_bytes() == data for p, data in before.items())
    out = capsys.readouterr().out
    assert f"flwr supernode register {pki.resolve()}/sites/hospital-c/hospital-c.pub lungmae --name hospital-c" in out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": [], "ips": []}, "names no host; give --server-name"),
        ({"names": ["bad name"], "ips": []}, "--server-name 'bad name' is not a DNS name"),
        ({"names": [], "ips": ["10.0.0.300"]}, "--server-ip '10.0.0.300' is not an IPv4 or IPv6 address"),
    ],
)
def test_bad_server_names_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    ca_key, ca_crt = make_ca(tmp_path / "ca")
    with pytest.raises(CertificateError, match=message):
        make_server_certificate(tmp_path / "server", ca_key, ca_crt, **kwargs)


def test_half_made_ca_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca/ca.crt").write_text("x")
    with pytest.raises(CertificateError, match="as only ca.crt exists"):
        make_ca(tmp_path / "ca")


def test_cli_reports_bad_site_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["certs", "--out", str(tmp_path), "--site", "Hospital A"]) == 2
    assert "Site name 'Hospital A' must be 1-63 lower-case letters" in capsys.readouterr().err
