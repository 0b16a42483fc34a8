"""Pseudonyms: keyed, stable, separated by kind; the site secret is created once, 0600, atomically."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from client.pseudonym import Pseudonymizer, load_or_create_secret
from lungmae_core.errors import SiteConfigError


def test_pseudonyms_are_stable_keyed_and_kind_separated() -> None:
    a, b = Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    assert a.patient("12345") == Pseudonymizer(b"k" * 32).patient("12345")
    assert a.patient("12345").startswith("pat-") and len(a.patient("12345")) == 4 + 16
    assert a.patient("12345") != b.patient("12345")  # another site's key: unrelated ids
    assert a.patient("1.2.3")[4:] != a.study("1.2.3")[4:] != a.series("1.2.3")[4:]
    assert "12345" not in repr(a) and "kkkk" not in repr(a)


def test_known_value() -> None:  # HMAC-SHA256(key, "patient\\0PAT-1"), first 16 hex digits
    import hashlib
    import hmac

    expected = hmac.new(b"s" * 32, b"patient\x00PAT-1", hashlib.sha256).hexdigest()[:16]
    assert Pseudonymizer(b"s" * 32).patient("PAT-1") == f"pat-{expected}"


@pytest.mark.parametrize("secret,length,message", [
    (b"short", 16, "secret should be at least 16 bytes, got 5"),
    (b"k" * 32, 4, "length should be in the range [8, 64], got 4"),
])
def test_bad_arguments(secret, length, message) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Pseudonymizer(secret, length=length)


def test_secret_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "site-secret.key"
    first = load_or_create_secret(path)
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_concurrent_creation_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "site-secret.key"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_secret(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys) == 8


@pytest.mark.parametrize("content,message", [
    ("not hex at all", "as it is not hexadecimal"),
    ("abcd", "as it holds 2 bytes; at least 16 are needed"),
])
def test_bad_secret_file(tmp_path: Path, content, message) -> None:
    path = tmp_path / "k.key"
    path.write_text(content)
    with pytest.raises(SiteConfigError, match=message):
        load_or_create_secret(path)


def test_readable_secret_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "k.key"
    path.write_text("ab" * 32)
    path.chmod(0o644)
    load_or_create_secret(path)
    assert "readable by other users (mode 644); run: chmod 600" in caplog.text


def test_a_key_left_in_the_cache_is_carried_to_the_state_folder(tmp_path: Path) -> None:
    legacy = tmp_path / "cache" / "site-secret.key"
    old = load_or_create_secret(legacy)  # where older versions kept it
    new_path = tmp_path / "state" / "site-secret.key"
    assert load_or_create_secret(new_path, legacy=legacy) == old  # same key: same pseudonyms
    assert stat.S_IMODE(new_path.stat().st_mode) == 0o600
    legacy.unlink()  # deleting the cache no longer changes the key
    assert load_or_create_secret(new_path, legacy=legacy) == old
    fresh = load_or_create_secret(tmp_path / "other" / "site-secret.key", legacy=tmp_path / "none.key")
    assert fresh != old and len(fresh) == 32
