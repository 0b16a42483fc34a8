"""Tests for client/node_key.py: the SuperNode key must be an unencrypted OpenSSH ECDSA private key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from client.node_key import NodeKeyError, check_site_key, make_site_key


def _ssh_keygen(path: Path, *args: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", *args, "-f", str(path)], check=True, capture_output=True)
    return path


def test_made_key_passes_and_is_kept(tmp_path: Path) -> None:
    key, pub = make_site_key(tmp_path, "hospital-a")
    assert check_site_key(key) == "ECDSA secp384r1"
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    data = key.read_bytes()
    assert make_site_key(tmp_path, "hospital-a") == (key, pub) and key.read_bytes() == data


def test_ssh_keygen_ecdsa_key_passes(tmp_path: Path) -> None:
    assert check_site_key(_ssh_keygen(tmp_path / "k", "-t", "ecdsa", "-b", "256", "-N", "")) == "ECDSA secp256r1"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "as it does not exist; make one with `lungmae certs --site NAME`"),
        (lambda d: _ssh_keygen(d / "k", "-t", "ed25519", "-N", ""), "as it is an Ed25519 key; Flower authenticates"),
        (lambda d: _ssh_keygen(d / "k", "-t", "ecdsa", "-N", "secret"), "as it is passphrase-protected"),
        (lambda d: Path(str(_ssh_keygen(d / "k", "-t", "ecdsa", "-N", "")) + ".pub"), "as it is a PUBLIC key"),
        (lambda d: (d / "k.txt").write_text("hello") and d / "k.txt", "as it is not an OpenSSH private key"),
    ],
)
def test_unusable_keys_are_explained(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(NodeKeyError, match=message.replace("(", r"\(")):
        check_site_key(make(tmp_path))
