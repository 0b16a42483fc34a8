"""Ed25519 signatures: the consortium's signature on an app bundle (FAB), the server's on audit lines.

The consortium signs each FAB it submits (``lungmae server run --signing-key``); a site runs a FAB only if a
key its ``site.yaml`` trusts signed it, or its SHA-256 is on the site's allow-list (``client/fab_check.py``).
The signed message is ``b"lungmae-fab-v1\\0" + sha256(FAB)``: a domain prefix, so that no other signature
made with the key (an audit line) can pass for a FAB signature.

Key files are PEM: the private key PKCS#8 (0600), the public key SubjectPublicKeyInfo, both what
``openssl genpkey -algorithm ed25519`` and ``openssl pkey -pubout`` write.

Examples:
    >>> key, pub = make_signing_key(Path("pki/signing"), "fab-signing")
    >>> sig = sign_fab(fab_bytes, key)
    >>> verify_fab(fab_bytes, sig, [pub])
    'fab-signing.pub'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from lungmae_core.atomic import atomic_write_bytes
from lungmae_core.errors import LungMAEError

__all__ = ["FAB_DOMAIN", "AUDIT_DOMAIN", "SigningKeyError", "fab_sha256", "load_private_key", "load_public_key",
           "make_signing_key", "sign", "sign_fab", "verify", "verify_fab"]

logger = logging.getLogger(__name__)

FAB_DOMAIN = b"lungmae-fab-v1\0"
AUDIT_DOMAIN = b"lungmae-audit-v1\0"


class SigningKeyError(LungMAEError, ValueError):
    """A signing key is missing, unreadable or not an Ed25519 key."""


def fab_sha256(fab: bytes) -> str:
    """Hex SHA-256 of a FAB's bytes (computed here, never taken from the sender)."""
    return hashlib.sha256(fab).hexdigest()


def make_signing_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Create ``<name>.key`` (0600) and ``<name>.pub`` in ``directory``, or reuse the pair there.

    Raises:
        SigningKeyError: if only one of the two files exists.
    """
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if key_path.exists() and pub_path.exists():
        return key_path, pub_path
    if key_path.exists() or pub_path.exists():
        raise SigningKeyError(f"Unable to create the signing key in {directory} as only one of {key_path.name} and "
                              f"{pub_path.name} exists; restore the other from your backup or move both away")
    key = ed25519.Ed25519PrivateKey.generate()
    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), 0o600)
    atomic_write_bytes(pub_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    logger.info("Created the Ed25519 signing key %s", key_path)
    return key_path, pub_path


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read a PEM Ed25519 private key.

    Raises:
        SigningKeyError: naming the file and what is wrong.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SigningKeyError(f"Unable to read the signing key {path} ({exc.strerror or exc}); make it with "
                              "`lungmae certs --out DIR`") from exc
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"Unable to read the signing key {path} as it is not an unencrypted PEM private "
                              f"key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """Read a PEM Ed25519 public key.

    Raises:
        SigningKeyError: naming the file and what is wrong.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise SigningKeyError(f"Unable to read the trusted key {path} ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise SigningKeyError(f"Unable to read the trusted key {path} as it is not a PEM public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign(data: bytes, key: Path | ed25519.Ed25519PrivateKey, domain: bytes) -> str:
    """Base64 Ed25519 signature over ``domain + data``."""
    private = load_private_key(key) if isinstance(key, Path | str) else key
    return base64.b64encode(private.sign(domain + data)).decode("ascii")


def verify(data: bytes, signature: str, key: ed25519.Ed25519PublicKey, domain: bytes) -> bool:
    """Whether ``signature`` (base64) is ``key``'s signature over ``domain + data``."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        key.verify(raw, domain + data)
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True


def sign_fab(fab: bytes, key: Path | ed25519.Ed25519PrivateKey) -> str:
    """The consortium's signature of a FAB (over its SHA-256)."""
    return sign(hashlib.sha256(fab).digest(), key, FAB_DOMAIN)


def verify_fab(fab: bytes, signature: str, trusted: Sequence[Path]) -> str | None:
    """The name of the trusted key file that signed ``fab``, or None if none did.

    Raises:
        SigningKeyError: if a trusted key file cannot be read (a broken policy is an error, not a refusal).
    """
    digest = hashlib.sha256(fab).digest()
    for path in trusted:
        if verify(digest, signature, load_public_key(path), FAB_DOMAIN):
            return Path(path).name
    return None
