"""The site's SuperNode authentication key: made and checked at the hospital, so it never has to leave it.

Flower authenticates each SuperNode with an ECDSA key pair on a NIST curve in OpenSSH format (what
``ssh-keygen -t ecdsa -b 384`` writes). The site keeps the private key (``connection: auth-key`` in
``site.yaml``); the coordinator registers the public key with ``flwr supernode register``, and the
SuperLink (``--enable-supernode-auth``) refuses any SuperNode whose key it does not know.

Examples:
    >>> key, pub = make_site_key(Path("/etc/lungmae/keys"), "hospital-a")
    >>> check_site_key(key)
    'ECDSA secp384r1'
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lungmae_core.atomic import atomic_write_bytes
from lungmae_core.errors import LungMAEError

__all__ = ["NodeKeyError", "SITE_NAME_RE", "check_site_key", "make_site_key"]

logger = logging.getLogger(__name__)

SITE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_FIX = "make one with `lungmae certs --site NAME` or `ssh-keygen -t ecdsa -b 384 -N '' -f FILE`"


class NodeKeyError(LungMAEError, ValueError):
    """The SuperNode key is missing, unreadable or of a kind Flower cannot use."""


def _public_line(key: ec.EllipticCurvePrivateKey, site: str) -> bytes:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public + f" lungmae-site-{site}\n".encode()


def make_site_key(site_dir: Path, site: str) -> tuple[Path, Path]:
    """Create the site's key pair ``<site>.key`` (0600) / ``<site>.pub`` in ``site_dir``, or keep an existing one.

    Args:
        site_dir: directory for the two files (created).
        site: site name, 1-63 lower-case letters, digits or '-'; becomes the SuperNode name.

    Returns:
        ``(private key path, public key path)``.

    Raises:
        NodeKeyError: for a bad site name or an existing key Flower cannot use.
    """
    if not SITE_NAME_RE.match(site):
        raise NodeKeyError(
            f"Site name {site!r} must be 1-63 lower-case letters, digits or '-', starting with a letter or digit "
            "(it becomes the SuperNode name and a file name)")
    key_path, pub_path = Path(site_dir) / f"{site}.key", Path(site_dir) / f"{site}.pub"
    if key_path.exists():
        check_site_key(key_path)
        if not pub_path.exists():
            key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
            atomic_write_bytes(pub_path, _public_line(key, site), 0o644)  # type: ignore[arg-type]
        logger.info("Keeping the existing key of site %s in %s", site, key_path)
        return key_path, pub_path
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()), 0o600)
    atomic_write_bytes(pub_path, _public_line(key, site), 0o644)
    logger.info("Created the authentication key of site %s in %s", site, key_path)
    return key_path, pub_path


def check_site_key(path: str | os.PathLike[str]) -> str:
    """Check that ``path`` is an unencrypted OpenSSH ECDSA private key on a NIST curve, as Flower needs.

    Returns:
        A description such as ``"ECDSA secp384r1"``.

    Raises:
        NodeKeyError: naming the file, what is wrong with it and how to make a good one.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NodeKeyError(f"Unable to use the SuperNode key {path} as it does not exist; {_FIX}") from None
    except OSError as exc:
        raise NodeKeyError(f"Unable to read the SuperNode key {path} as {exc.strerror or exc}; {_FIX}") from exc
    if data.lstrip().startswith((b"ssh-", b"ecdsa-")):
        raise NodeKeyError(
            f"Unable to use the SuperNode key {path} as it is a PUBLIC key; give the private key here and "
            "register the .pub file at the coordinator")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError as exc:
        raise NodeKeyError(
            f"Unable to use the SuperNode key {path} as it is passphrase-protected; the SuperNode starts "
            f"unattended, so it needs a key without passphrase: {_FIX}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise NodeKeyError(f"Unable to use the SuperNode key {path} as it is not an OpenSSH private key; "
                           f"{_FIX}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.replace("PrivateKey", "").lstrip("_")
        raise NodeKeyError(
            f"Unable to use the SuperNode key {path} as it is an {kind} key; Flower authenticates SuperNodes "
            f"with ECDSA keys on a NIST curve: {_FIX}")
    if path.stat().st_mode & 0o077:
        logger.warning("SuperNode key %s is readable by other users; run `chmod 600 %s`", path, path)
    return f"ECDSA {key.curve.name}"
