"""Consortium PKI at the coordinator: the CA and the SuperLink's TLS certificate.

The SuperLink presents a certificate signed by the consortium CA; every site verifies it with the CA
certificate (``connection: root-certificates`` in ``site.yaml``). The certificate must name every DNS name
and IP address that sites use to reach the coordinator (subjectAltName), or the TLS handshake fails.
SuperNode authentication keys are a separate mechanism and are made at the site (``client/node_key.py``),
so a site's private key never has to leave the hospital. ``lungmae certs`` drives both for a consortium.

Mutual TLS: the coordinator's reverse proxy (nginx, ``deploy/nginx/``) admits only clients presenting a
certificate of the consortium CA that is not on the CA's revocation list (``ca/crl.pem``, rewritten by every
``lungmae certs`` run and by ``lungmae certs --revoke SITE``). Two Ed25519 keys complete the PKI: the
consortium's app-signing key (sites trust its ``.pub``) and the server's audit-signing key.

Layout::

    <out>/ca/ca.key            CA private key (0600): keep it offline
    <out>/ca/ca.crt            CA certificate: give it to every site
    <out>/server/server.key    SuperLink TLS key (0600)
    <out>/server/server.pem    SuperLink TLS certificate, SANs = the server's DNS names and IPs
    <out>/server/ca.crt        copy of the CA certificate (flower-superlink --ssl-ca-certfile)
    <out>/ca/crl.pem           revocation list the proxy checks (valid CRL_DAYS; refreshed by each run)
    <out>/sites/<s>/<s>.client.pem / .client.key   a site's TLS client certificate (clientAuth) and key
    <out>/signing/fab-signing.key / .pub           consortium app-bundle signing key (keep .key offline)
    <out>/server/audit-signing.key / .pub          the server's audit-log signing key

Examples:
    >>> ca_key, ca_crt = make_ca(Path("pki/ca"))
    >>> make_server_certificate(Path("pki/server"), ca_key, ca_crt, names=["fl.consortium.org"],
    ...                         ips=["10.0.0.5"])
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lungmae_core.atomic import atomic_write_bytes
from lungmae_core.errors import LungMAEError

__all__ = ["CRL_DAYS", "CertificateError", "certificate_summary", "make_ca", "make_client_certificate", "revoke",
           "revoked_serials", "write_crl", "make_server_certificate"]

logger = logging.getLogger(__name__)

CRL_DAYS = 90  # the proxy refuses every client once the CRL expires: rerun `lungmae certs` before that
_DEFAULT_DAYS = 825  # the longest validity browsers and most TLS stacks still accept for leaf certificates


class CertificateError(LungMAEError, ValueError):
    """A certificate or key could not be made, read or is of the wrong kind."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def make_ca(ca_dir: Path, organisation: str = "LungMAE-FL consortium", days: int = 3650) -> tuple[Path, Path]:
    """Create the consortium CA (RSA 3072, self-signed) in ``ca_dir``, or reuse the one there.

    Returns:
        ``(ca.key, ca.crt)`` paths.

    Raises:
        CertificateError: if only one of the two files exists (a half-made CA).
    """
    key_path, crt_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if key_path.exists() and crt_path.exists():
        logger.info("Reusing the consortium CA in %s", ca_dir)
        return key_path, crt_path
    if key_path.exists() or crt_path.exists():
        present = key_path if key_path.exists() else crt_path
        raise CertificateError(
            f"Unable to create the consortium CA in {ca_dir} as only {present.name} exists; restore the missing "
            "file from your backup, or move the directory away to start a new CA (sites must then get the new "
            "ca.crt)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _dt.timedelta(minutes=5)).not_valid_after(_now() + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    atomic_write_bytes(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    logger.info("Created the consortium CA in %s", ca_dir)
    return key_path, crt_path


def _parse_sans(names: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            raise CertificateError(f"--server-name {name!r} is not a DNS name (letters, digits, '-' and '.')")
        sans.append(x509.DNSName(name))
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertificateError(f"--server-ip {ip!r} is not an IPv4 or IPv6 address") from None
    if not sans:
        raise CertificateError(
            "Unable to make the server certificate as it names no host; give --server-name (DNS names sites use "
            "to reach the coordinator) and/or --server-ip (its IP addresses)")
    return sans


def _load_ca_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The CA's private key (PEM, unencrypted), which must be one this module makes: EC or RSA.

    Raises:
        CertificateError: when the file holds another kind of key.
    """
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateError(f"Unable to sign with the CA key {path} as it is a {type(key).__name__}; "
                               "expected an EC or RSA private key (as `lungmae certs` writes)")
    return key


def _issue_leaf(subject: x509.Name, usage: x509.ObjectIdentifier, ca_key: Path, ca_crt: Path, days: int,
                key_path: Path, crt_path: Path, *, sans: list[x509.GeneralName] | None = None) -> None:
    """Issue an end-entity certificate (ECDSA P-256, one extended key usage) signed by the CA; write both files.

    The private key is written 0600 and the certificate 0644, each atomically.
    """
    ca_private = _load_ca_key(ca_key)
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _dt.timedelta(minutes=5)).not_valid_after(_now() + _dt.timedelta(days=days))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = (
        builder
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()), critical=False)
        .sign(ca_private, hashes.SHA256())
    )
    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    atomic_write_bytes(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def make_server_certificate(
    server_dir: Path,
    ca_key: Path,
    ca_crt: Path,
    *,
    names: Sequence[str],
    ips: Sequence[str] = (),
    days: int = _DEFAULT_DAYS,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate (ECDSA P-256, serverAuth) signed by the CA.

    Args:
        server_dir: where ``server.key``, ``server.pem`` and a copy of ``ca.crt`` go.
        ca_key / ca_crt: the consortium CA.
        names: DNS names sites use to reach the coordinator (first one is the common name).
        ips: IP addresses sites use to reach the coordinator.
        days: validity. Defaults to 825.
        overwrite: replace an existing server certificate (e.g. to add a name). Defaults to False.

    Returns:
        ``(server.key, server.pem)`` paths.

    Raises:
        CertificateError: for a bad name or address, or an existing certificate without ``overwrite``.
    """
    sans = _parse_sans(names, ips)
    key_path, crt_path = server_dir / "server.key", server_dir / "server.pem"
    if crt_path.exists() and not overwrite:
        logger.info("Keeping the existing server certificate %s (use --renew-server to reissue it)", crt_path)
        return key_path, crt_path
    common_name = names[0] if names else ips[0]
    _issue_leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), ExtendedKeyUsageOID.SERVER_AUTH,
                ca_key, ca_crt, days, key_path, crt_path, sans=sans)
    atomic_write_bytes(server_dir / "ca.crt", ca_crt.read_bytes(), 0o644)
    logger.info("Issued the server certificate %s for %s", crt_path, ", ".join([*names, *ips]))
    return key_path, crt_path


def make_client_certificate(site_dir: Path, site: str, ca_key: Path, ca_crt: Path, *,
                            days: int = _DEFAULT_DAYS, overwrite: bool = False) -> tuple[Path, Path]:
    """Issue a site's TLS client certificate (ECDSA P-256, clientAuth, CN = site name) signed by the CA.

    Returns:
        ``(<site>.client.key, <site>.client.pem)`` in ``site_dir``; an existing pair is kept unless ``overwrite``.
    """
    key_path, crt_path = site_dir / f"{site}.client.key", site_dir / f"{site}.client.pem"
    if crt_path.exists() and key_path.exists() and not overwrite:
        return key_path, crt_path
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LungMAE-FL site"),
                         x509.NameAttribute(NameOID.COMMON_NAME, site)])
    _issue_leaf(subject, ExtendedKeyUsageOID.CLIENT_AUTH, ca_key, ca_crt, days, key_path, crt_path)
    logger.info("Issued the TLS client certificate %s for site %s", crt_path, site)
    return key_path, crt_path


def revoked_serials(crl_path: Path) -> dict[int, _dt.datetime]:
    """Serial number -> revocation time of the CRL at ``crl_path`` (empty when there is none)."""
    if not crl_path.exists():
        return {}
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except ValueError as exc:
        raise CertificateError(f"Unable to read the revocation list {crl_path} ({exc}); restore it from your "
                               "backup: it is the only record of which site certificates were revoked") from exc
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def write_crl(ca_key: Path, ca_crt: Path, crl_path: Path, add: dict[int, _dt.datetime] | None = None,
              days: int = CRL_DAYS) -> Path:
    """(Re)write the CA's revocation list with every serial revoked so far plus ``add``, valid ``days``."""
    ca_private = _load_ca_key(ca_key)
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    serials = {**revoked_serials(crl_path), **(add or {})}
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(_now() - _dt.timedelta(minutes=5)).next_update(_now() + _dt.timedelta(days=days)))
    for serial, when in sorted(serials.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    crl = builder.sign(ca_private, hashes.SHA256())
    atomic_write_bytes(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return crl_path


def revoke(ca_key: Path, ca_crt: Path, crl_path: Path, certificate: Path) -> int:
    """Put ``certificate`` on the CRL; returns its serial number. Reload the proxy afterwards.

    Raises:
        CertificateError: if the certificate cannot be read or was not issued by this CA.
    """
    try:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"Unable to revoke {certificate} as it cannot be read as a PEM certificate "
                               f"({exc})") from exc
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    if cert.issuer != ca_cert.subject:
        raise CertificateError(f"Unable to revoke {certificate} as it was issued by {cert.issuer.rfc4514_string()}, "
                               f"not by this CA ({ca_cert.subject.rfc4514_string()})")
    write_crl(ca_key, ca_crt, crl_path, {cert.serial_number: _now()})
    logger.info("Revoked %s (serial %x)", certificate, cert.serial_number)
    return cert.serial_number


def certificate_summary(crt: Path) -> dict[str, object]:
    """Subject, SANs and validity of a PEM certificate, for ``lungmae certs`` output and preflight hints.

    Raises:
        CertificateError: if ``crt`` is not a readable PEM certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(crt).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"Unable to read the certificate {crt} as {exc}") from exc
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans]
    except x509.ExtensionNotFound:
        names = []
    return {"subject": cert.subject.rfc4514_string(), "sans": names,
            "not_after": cert.not_valid_after_utc.isoformat()}
