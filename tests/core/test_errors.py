"""read_text: every reader of a user's file fails the same way, naming the file, why, and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungmae_core.errors import CacheError, SiteConfigError, read_text


def test_missing_file_names_it_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    with pytest.raises(CacheError, match=rf"^Unable to read {path} as it does not exist; run it first$"):
        read_text(path, CacheError, fix="run it first")
    with pytest.raises(SiteConfigError, match=rf"^Unable to read the labels CSV {path} as it does not exist$"):
        read_text(path, SiteConfigError, what="the labels CSV")


def test_undecodable_and_unreadable_files_give_the_reason(tmp_path: Path) -> None:
    binary = tmp_path / "site.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SiteConfigError, match=rf"^Unable to read {binary} as 'utf-8' codec can't decode") as info:
        read_text(binary, SiteConfigError)
    assert isinstance(info.value.__cause__, UnicodeDecodeError)
    with pytest.raises(CacheError, match=rf"^Unable to read {tmp_path} as Is a directory$"):
        read_text(tmp_path, CacheError)


def test_text_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffpatient_id,label\n".encode())
    assert read_text(path, SiteConfigError, encoding="utf-8-sig") == "patient_id,label\n"
