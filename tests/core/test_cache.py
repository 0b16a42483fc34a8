"""The sample cache: keys, round trip, atomic writes (a crash leaves nothing under the final name) and
clear errors on truncated or foreign files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from lungmae_core.cache import (
    cache_key,
    read_sample,
    read_sample_meta,
    remove_stale_temp_files,
    sample_path,
    write_sample,
)
from lungmae_core.config import PreprocessConfig
from lungmae_core.errors import CacheError
from lungmae_core.preprocess import Sample


def make_sample(size: int = 8, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    image = rng.random((1, size, size, size), dtype=np.float32)
    return Sample(image=image, lung_mask=(image > 0.5).astype(np.uint8), qc={"lung_volume_ml": 4200.0})


def test_key_depends_on_source_and_parameters():
    cfg = PreprocessConfig()
    key = cache_key("series-a", cfg)
    assert key == cache_key("series-a", PreprocessConfig()) and len(key) == 32
    assert key != cache_key("series-b", cfg)
    assert key != cache_key("series-a", PreprocessConfig(size=64))
    with pytest.raises(CacheError, match="source fingerprint is empty"):
        cache_key("", cfg)


def test_round_trip_keeps_arrays_qc_and_meta(tmp_path):
    sample = make_sample()
    key = cache_key("s1", PreprocessConfig())
    path = write_sample(tmp_path, key, sample, {"label": "ggo", "patient_id": "p-1"})
    assert path == tmp_path / "samples" / f"{key}.npz" == sample_path(tmp_path, key)
    back = read_sample(path)
    np.testing.assert_array_equal(back.image, sample.image)
    np.testing.assert_array_equal(back.lung_mask, sample.lung_mask)
    assert back.image.dtype == np.float32 and back.lung_mask.dtype == np.uint8
    assert back.qc == {"lung_volume_ml": 4200.0}
    assert read_sample_meta(path) == {"label": "ggo", "patient_id": "p-1"}
    assert [p.name for p in (tmp_path / "samples").iterdir()] == [f"{key}.npz"]  # no temp files left
    assert path.stat().st_mode & 0o777 == 0o600  # patient-derived data: owner only


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    key = "ab" * 16

    def exploding_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", exploding_savez)
    with pytest.raises(CacheError, match="Unable to write cached sample .* as No space left on device"):
        write_sample(tmp_path, key, make_sample())
    assert not sample_path(tmp_path, key).exists()
    assert list((tmp_path / "samples").iterdir()) == []


def test_killed_writer_leaves_only_a_temp_file_that_is_cleaned_up(tmp_path):
    """A real crash: the writing process dies mid-write (os._exit) before the rename."""
    key = "cd" * 16
    script = textwrap.dedent(f"""
        import os, numpy as np
        from lungmae_core import cache
        from lungmae_core.preprocess import Sample
        def dying_savez(fh, **arrays):
            fh.write(b"PK\\x03\\x04 half a zip")
            fh.flush()
            os._exit(9)
        np.savez = dying_savez
        img = np.zeros((1, 4, 4, 4), np.float32)
        cache.write_sample({str(tmp_path)!r}, {key!r}, Sample(img, img.astype(np.uint8), {{}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    assert not sample_path(tmp_path, key).exists()
    leftovers = list((tmp_path / "samples").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{key}.") and leftovers[0].suffix == ".tmp"
    assert remove_stale_temp_files(tmp_path) == 1
    assert list((tmp_path / "samples").iterdir()) == []


def test_truncated_file_is_rejected_naming_it(tmp_path):
    path = write_sample(tmp_path, "ef" * 16, make_sample(16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError) as exc:
        read_sample(path)
    assert str(path) in str(exc.value) and "truncated or corrupt" in str(exc.value)
    assert "re-run `lungmae site prepare`" in str(exc.value)


def test_foreign_and_malformed_files_are_rejected(tmp_path):
    missing_meta = tmp_path / "a.npz"
    np.savez(missing_meta, image=np.zeros((1, 4, 4, 4), np.float32), lung_mask=np.zeros((1, 4, 4, 4), np.uint8))
    with pytest.raises(CacheError, match="lacks meta"):
        read_sample(missing_meta)
    wrong_format = tmp_path / "b.npz"
    np.savez(wrong_format, image=np.zeros((1, 4, 4, 4), np.float32), lung_mask=np.zeros((1, 4, 4, 4), np.uint8),
             meta=np.array(json.dumps({"format": 99})))
    with pytest.raises(CacheError, match="its format is 99, expected 1"):
        read_sample(wrong_format)
    bad_shape = tmp_path / "c.npz"
    np.savez(bad_shape, image=np.zeros((4, 4, 4), np.float32), lung_mask=np.zeros((4, 4, 4), np.uint8),
             meta=np.array(json.dumps({"format": 1})))
    with pytest.raises(CacheError, match=r"image must have shape \(1, S, S, S\); got \(4, 4, 4\)"):
        read_sample(bad_shape)
    not_zip = tmp_path / "d.npz"
    not_zip.write_text("hello")
    with pytest.raises(CacheError, match="truncated or corrupt"):
        read_sample(not_zip)
    with pytest.raises(CacheError, match="does not exist"):
        read_sample(tmp_path / "nope.npz")
    assert zipfile.is_zipfile(missing_meta)


@pytest.mark.parametrize("key,sample,meta,message", [
    ("../../etc", make_sample(), None, "must be 8-64 lowercase hex digits"),
    ("ab" * 16, Sample(np.zeros((1, 4, 4, 4), np.float64), np.zeros((1, 4, 4, 4), np.uint8), {}), None,
     "image must be float32 and lung_mask uint8; got float64"),
    ("ab" * 16, Sample(np.zeros((1, 4, 4, 4), np.float32), np.zeros((1, 4, 4, 2), np.uint8), {}), None,
     "lung_mask shape (1, 4, 4, 2) differs from image shape (1, 4, 4, 4)"),
    ("ab" * 16, make_sample(), {"when": object()}, "is not JSON-serialisable"),
])
def test_bad_writes_are_refused(tmp_path, key, sample, meta, message):
    with pytest.raises(CacheError) as exc:
        write_sample(tmp_path, key, sample, meta)
    assert message in str(exc.value)
