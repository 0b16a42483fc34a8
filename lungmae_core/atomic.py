"""Atomic file writes: a temporary file in the same folder, fsync'd, then ``os.replace`` over the final name.

Every file LungMAE-FL writes that someone may read back (cache samples, manifests, checkpoints, ledgers, keys,
certificates, reports) goes through here, so a crash or a killed process leaves either the old file or the
new one under the final name, never a partial one, and no stray temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json_object"]


def _default_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'd and renamed to ``path``.

    For writers that want a file name (``np.savez``, ``torch.save``). On any exception the temporary file is
    removed and ``path`` is left as it was.

    Args:
        path: the final file name; its folder is created if needed.
        mode: permission bits set on the temporary file before the rename (e.g. ``0o600`` for keys and for
            anything derived from patient data), so the final name never exists with looser permissions.
            ``None``: what a plain ``open()`` would give (``0o666`` less the umask).
        fsync: flush the data to disk before the rename (the default). Only files that can be regenerated at
            will (synthetic DICOM, thousands per site) skip it.

    Examples:
        >>> with atomic_path(cache / "samples" / "ab12.npz") as tmp:
        ...     np.savez(tmp, image=image)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _default_mode() if mode is None else mode)
        os.close(fd)
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically, newlines as given (CSV writers choose their own)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int | None = None, *,
                      sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (trailing newline; values JSON cannot hold as ``str``) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n", mode)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object file read back, or ``None`` when it is missing, unreadable or not a JSON object.

    The counterpart of :func:`atomic_write_json` for files that may legitimately be absent (a state file
    before the first round, a chain head before the first record): callers treat ``None`` as "not yet".
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
