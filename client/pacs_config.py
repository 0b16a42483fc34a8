"""The ``pacs`` section of ``site.yaml``: where `lungmae site pull` finds the hospital's DICOMweb server.

Kept apart from the other sections so the pull command owns its keys and their checks; ``client.site_config``
only lists the section. Example::

    pacs:
      url: https://pacs.hospital.local/dicom-web   # the DICOMweb root (QIDO-RS and WADO-RS below it)
      since: 2024-01-01                             # default start of the StudyDate range
      folder: pacs                                  # pulled series go to <data.input>/pacs/<study>/<series>/
      timeout-s: 60
      username: lungmae                             # HTTP basic authentication, with password-file
      password-file: pacs-password.txt
      ca-certificates: hospital-ca.pem              # TLS trust for an in-house CA
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

from lungmae_core.config import check
from lungmae_core.errors import SiteConfigError

__all__ = ["PacsSection", "parse_study_date"]


def parse_study_date(value: str, where: str) -> dt.date:
    """A date written ``YYYY-MM-DD`` or ``YYYYMMDD`` (DICOM's DA), as the command line and site.yaml take it.

    Anything else (a number, a list) is reported as not a date as well.

    Raises:
        SiteConfigError: naming ``where`` and the two accepted forms.
    """
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise SiteConfigError(f"{where} must be a date as YYYY-MM-DD or YYYYMMDD; got {value!r}")


@dataclasses.dataclass(frozen=True)
class PacsSection:
    """``pacs``: the hospital's DICOMweb server, queried by `lungmae site pull`.

    Args:
        url: DICOMweb root URL (``http://`` or ``https://``); QIDO-RS and WADO-RS are below it. None: no PACS.
        since: default start of the StudyDate range (``YYYY-MM-DD``) when ``--since`` is not given.
        folder: sub-folder of ``data.input`` that pulled series go to. Defaults to ``pacs``.
        timeout-s: seconds to wait for the server to answer a request (connect, and between bytes). Defaults to 60.
        retries: attempts for a request answered 429/503/504 (busy server), with exponential back-off. Defaults to 3.
        username: user for HTTP basic authentication; needs ``password-file``.
        password-file: file holding the password (first line); kept out of site.yaml so the file can be 0600.
        ca-certificates: PEM bundle to verify the server's TLS certificate (an in-house CA); None: system CAs.
    """

    url: str | None = None
    since: str | dt.date | None = None  # YAML reads an unquoted 2024-01-01 as a date
    folder: str = "pacs"
    timeout_s: float = 60.0
    retries: int = 3
    username: str | None = None
    password_file: Path | None = None
    ca_certificates: Path | None = None

    def __post_init__(self) -> None:
        err = SiteConfigError
        check(self.url is None or bool(re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.url)),
              f"'url' must be the DICOMweb root, e.g. 'https://pacs.example.org/dicom-web'; got {self.url!r}", err)
        if self.since is not None:
            since = self.since if isinstance(self.since, dt.date) else parse_study_date(self.since, "'since'")
            object.__setattr__(self, "since", since.isoformat())  # one form, whichever way it was written
        check(bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.folder)) and self.folder not in (".", ".."),
              f"'folder' must be one folder name (letters, digits, '_', '.', '-'); got {self.folder!r}", err)
        check(0 < self.timeout_s <= 3600, f"'timeout-s' must be in (0, 3600]; got {self.timeout_s}", err)
        check(1 <= self.retries <= 10, f"'retries' must be in [1, 10]; got {self.retries}", err)
        check((self.username is None) == (self.password_file is None),
              "'username' and 'password-file' go together (HTTP basic authentication); set both or neither", err)
