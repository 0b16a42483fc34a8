"""Atomic writes: the final name holds the old or the new content, never a partial file or a stray temp."""

from __future__ import annotations

import json
import os
import stat

import pytest

from lungmae_core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"round": 1})
    atomic_write_json(target, {"round": 2})
    assert json.loads(target.read_text()) == {"round": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_failure_inside_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.pt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode_is_set_before_the_file_appears(tmp_path, mode):
    target = tmp_path / "site.key"
    atomic_write_text(target, "secret", mode=mode)
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_default_mode_follows_the_umask_like_open(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o640


def test_read_json_object_reads_back_what_was_written_and_nothing_else(tmp_path):
    from lungmae_core.atomic import atomic_write_json, read_json_object

    path = tmp_path / "state.json"
    assert read_json_object(path) is None  # not written yet
    atomic_write_json(path, {"round": 3})
    assert read_json_object(path) == {"round": 3}
    path.write_text('{"round": ', encoding="utf-8")  # cut short
    assert read_json_object(path) is None
    path.write_text("[1, 2]", encoding="utf-8")  # JSON, but not an object
    assert read_json_object(path) is None
    path.write_bytes(b"\xff\xfe{")  # not text
    assert read_json_object(path) is None
