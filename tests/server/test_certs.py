"""Tests for server/ops/certs.py and `lungmae certs`: a CA, a server certificate OpenSSL accepts, site keys."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from lungmae_cli.main import main
from server.ops.certs import CertificateError, certificate_summary, make_ca, make_server_certificate


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
    # every file is kept except the revocation list, which each run re-signs so that it does not expire
    before = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file() and p.name != "crl.pem"}
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


def test_site_client_certificates_verify_and_revocation_is_checked(pki: Path) -> None:
    """Each site gets a clientAuth certificate of the CA; `--revoke` puts it on the CRL OpenSSL checks."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    crt, crl = pki / "sites/hospital-a/hospital-a.client.pem", pki / "ca/crl.pem"
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert stat.S_IMODE((pki / "sites/hospital-a/hospital-a.client.key").stat().st_mode) == 0o600

    def verify(site: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", pki / "ca/ca.crt", "-CRLfile", crl,
                               pki / f"sites/{site}/{site}.client.pem"], capture_output=True, text=True, check=False)

    assert verify("hospital-a").returncode == 0 and verify("hospital-b").returncode == 0
    assert main(["certs", "--out", str(pki), "--revoke", "hospital-b"]) == 0
    revoked = verify("hospital-b")
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    assert verify("hospital-a").returncode == 0
    assert main(["certs", "--out", str(pki)]) == 0  # refreshing the CRL keeps every revocation
    assert "certificate revoked" in verify("hospital-b").stdout + verify("hospital-b").stderr


def test_revoking_an_unknown_site_names_it(pki: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["certs", "--out", str(pki), "--revoke", "nowhere"]) == 2
    assert "Unable to revoke site 'nowhere'" in capsys.readouterr().err


def test_signing_keys_are_made_once_and_sites_get_the_public_key(pki: Path) -> None:
    from lungmae_core.signing import load_private_key, load_public_key, sign_fab, verify_fab

    key, pub = pki / "signing/fab-signing.key", pki / "signing/fab-signing.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (pki / "sites/hospital-a/fab-signing.pub").read_bytes() == pub.read_bytes()
    load_public_key(pki / "server/audit-signing.pub")
    before = key.read_bytes()
    assert main(["certs", "--out", str(pki), "--site", "hospital-c"]) == 0
    assert key.read_bytes() == before  # never replaced: sites trust it
    assert verify_fab(b"fab", sign_fab(b"fab", load_private_key(key)), [pub]) == "fab-signing.pub"
