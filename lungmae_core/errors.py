"""One hierarchy of exceptions for everything a user, a site or a coordinator can cause.

Internal shape invariants use ``assert``; anything that bad input can trigger raises one of these,
with a message that names the file, the field and what was expected.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "read_text",
    "LungMAEError",
    "ConfigError",
    "SiteConfigError",
    "FederationConfigError",
    "InvalidSeriesError",
    "CacheError",
    "PrivacyBudgetExceeded",
    "NonFiniteLossError",
    "WeightsMismatchError",
    "DatasetError",
]


class LungMAEError(Exception):
    """Base class of all errors raised on purpose by LungMAE-FL."""


class ConfigError(LungMAEError, ValueError):
    """A configuration file or mapping has an unknown key, a missing key or a bad value."""


class SiteConfigError(ConfigError):
    """``site.yaml`` (the hospital's own configuration) is invalid."""


class FederationConfigError(ConfigError):
    """``federation.yaml`` (the coordinator's configuration) is invalid."""


class InvalidSeriesError(LungMAEError, ValueError):
    """A CT series (or NIfTI volume) cannot be turned into a training sample.

    The message says why in words hospital IT can act on; it never contains patient identifiers,
    UIDs or file paths of the source, so it may be logged and reported.
    """


class CacheError(LungMAEError):
    """The preprocessed cache of a site is missing, empty or unreadable."""


class PrivacyBudgetExceeded(LungMAEError):
    """Training one more round would spend more privacy budget than the site allows."""


class NonFiniteLossError(LungMAEError, FloatingPointError):
    """The training loss became NaN or infinite; raised at once with the step where it happened."""


class WeightsMismatchError(LungMAEError, ValueError):
    """Weights do not fit a model: keys missing, unexpected or of another shape (each one is named)."""


class DatasetError(LungMAEError, ValueError):
    """A dataset does not fit the training or evaluation asked of it (volume size, labels, emptiness)."""


def read_text(path: Path, error: type[LungMAEError], *, what: str = "", fix: str = "",
              encoding: str = "utf-8") -> str:
    """The text of the file ``path``, or ``error`` naming the file and why it could not be read.

    Every reader of a user's file (a YAML config, the manifest, a labels CSV) fails the same way: a missing
    file says so and what to do (``fix``), an unreadable or undecodable one gives the reason.

    Args:
        path: the file.
        error: the exception class to raise (the reader's own, e.g. ``CacheError``).
        what: what the file is, put before its path (e.g. ``"the labels CSV"``).
        fix: what to do when the file does not exist.
        encoding: its text encoding. Defaults to UTF-8.
    """
    name = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise error(f"Unable to read {name} as it does not exist" + (f"; {fix}" if fix else "")) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"Unable to read {name} as {reason}") from exc
