"""Pseudonymous identifiers for patients, studies and series: HMAC-SHA256 keyed with a site secret.

The manifest, the logs and everything the client sends refer to scans by these ids only. A keyed hash (not a
plain hash) is used because identifiers such as PatientID are guessable: without the site's secret nobody can
check a guess against a pseudonym. The secret never leaves the site. It lives in the site's state folder
(``site: state-dir``), not in the cache: the privacy ledger counts patients by these pseudonyms, so a key that
changed with every rebuilt cache would turn one patient into a new one.

Examples:
    >>> p = Pseudonymizer(b"0" * 32)
    >>> p.patient("12345")
    'pat-...'
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from lungmae_core.errors import SiteConfigError

__all__ = ["Pseudonymizer", "load_or_create_secret", "SECRET_BYTES"]

logger = logging.getLogger(__name__)

SECRET_BYTES = 32  # 256-bit key, stored as 64 hex characters
_PREFIXES = {"patient": "pat", "study": "stu", "series": "ser", "file": "file"}


class Pseudonymizer:
    """Map identifiers to stable pseudonyms such as ``pat-3f9c0a1b2c3d4e5f``.

    Args:
        secret: the site's HMAC key (at least 16 bytes).
        length: hex digits kept from the digest. Defaults to 16 (64 bits: collisions are negligible at site
            scale, and ids stay readable in a CSV).

    Raises:
        ValueError: if the secret is shorter than 16 bytes or ``length`` not in [8, 64].
    """

    def __init__(self, secret: bytes, length: int = 16) -> None:
        if len(secret) < 16:
            raise ValueError(f"secret should be at least 16 bytes, got {len(secret)}")
        if not 8 <= length <= 64:
            raise ValueError(f"length should be in the range [8, 64], got {length}")
        self._secret = bytes(secret)
        self._length = length

    def __repr__(self) -> str:  # never show the key
        return f"Pseudonymizer(length={self._length})"

    def pseudonym(self, kind: str, identifier: str) -> str:
        """The pseudonym of ``identifier`` of the given ``kind`` (``patient``, ``study``, ``series``, ``file``).

        The kind is part of the hashed message, so one value used as a PatientID and as a UID gives two
        unrelated pseudonyms.
        """
        if kind not in _PREFIXES:
            raise ValueError(f"kind should be one of {', '.join(_PREFIXES)}, got {kind!r}")
        digest = hmac.new(self._secret, f"{kind}\x00{identifier}".encode(), hashlib.sha256).hexdigest()
        return f"{_PREFIXES[kind]}-{digest[:self._length]}"

    def patient(self, patient_id: str) -> str:
        """Pseudonym of a (0010,0020) Patient ID."""
        return self.pseudonym("patient", patient_id)

    def study(self, study_uid: str) -> str:
        """Pseudonym of a (0020,000D) Study Instance UID."""
        return self.pseudonym("study", study_uid)

    def series(self, series_uid: str) -> str:
        """Pseudonym of a (0020,000E) Series Instance UID (or of a NIfTI file's relative path)."""
        return self.pseudonym("series", series_uid)


def _parse_secret(text: str, path: Path) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SiteConfigError(f"Unable to use the site secret {path} as it is not hexadecimal; delete it to make "
                              "a new one (pseudonyms will change) or restore it from backup") from None
    if len(key) < 16:
        raise SiteConfigError(f"Unable to use the site secret {path} as it holds {len(key)} bytes; at least 16 are "
                              "needed")
    return key


def load_or_create_secret(path: str | os.PathLike[str], *, legacy: str | os.PathLike[str] | None = None) -> bytes:
    """Read the site's HMAC key, creating it (mode 0600, atomically) on first use.

    Creation writes a private temporary file and hard-links it into place, so two processes starting at once
    agree on one key and nobody ever reads a half-written file.

    Args:
        path: the key file (``<state-dir>/site-secret.key`` unless ``data.secret-file`` names another).
        legacy: where an older version kept the key (``<cache>/site-secret.key``). When ``path`` does not exist
            but this does, its key is carried over (same pseudonyms), not replaced by a new one.

    Returns:
        The key bytes.

    Raises:
        SiteConfigError: if the file exists but is not a valid key, or cannot be created.
    """
    path = Path(path)
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning("The site secret %s is readable by other users (mode %o); run: chmod 600 %s",
                           path, mode, path)
        return _parse_secret(path.read_text(encoding="ascii", errors="replace"), path)
    key_text = secrets.token_hex(SECRET_BYTES)
    if legacy is not None and Path(legacy).is_file():
        key_text = _parse_secret(Path(legacy).read_text(encoding="ascii", errors="replace"), Path(legacy)).hex()
        logger.warning("Moving the site secret from %s (inside the cache) to %s so that pseudonyms survive the "
                       "cache; the old copy may be deleted", legacy, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(key_text + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if another process created the key first: then use theirs
                logger.info("Created a new site secret for pseudonyms at %s (keep it; mode 0600)", path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise SiteConfigError(f"Unable to create the site secret {path} as {exc.strerror or exc}") from exc
    return _parse_secret(path.read_text(encoding="ascii"), path)
