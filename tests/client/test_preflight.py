"""Tests for client/preflight.py: each broken precondition gives a FAIL line with the right message and a fix.

The site here is a small real one: phantom DICOM written by `lungmae synth`, prepared by `site prepare`.
The SuperLink check runs against real TLS servers on 127.0.0.1 (a plain `ssl` server with a certificate
from `lungmae certs`); the full SuperLink is exercised in tests/e2e/test_tls_deployment.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from client.preflight import run_preflight, tls_probe
from lungmae_cli.main import main


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    assert main(["certs", "--out", str(out), "--server-name", "localhost", "--server-ip", "127.0.0.1",
                 "--site", "site0"]) == 0
    return out


@pytest.fixture(scope="module")
def prepared_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from lungmae_cli.synth import write_synthetic_sites

    root = tmp_path_factory.mktemp("site")
    (path,) = write_synthetic_sites(root, sites=1, scans_per_site=2, seed=5, shape=(40, 64, 64),
                                    preprocess_size=32, workers=1)
    prepare_site(load_site_config(path))
    return path


def _serve_tls(context: ssl.SSLContext, answer: bytes | None) -> Iterator[int]:
    """Accept TLS connections on 127.0.0.1 until the fixture ends; after the handshake, read one request and
    send ``answer`` (None: close at once). Yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    if answer is not None:
                        tls.recv(4096)
                        tls.sendall(answer)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.fixture(scope="module")
def tls_server(pki: Path) -> Iterator[int]:
    """A TLS server with the consortium's server certificate: what the SuperLink presents."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server/server.pem", pki / "server/server.key")
    yield from _serve_tls(context, None)


def _site(prepared_site: Path, tmp_path: Path, pki: Path, port: int, **changes: dict) -> Path:
    """A copy of the prepared site.yaml in the same folder (relative paths keep working), with changes."""
    data = yaml.safe_load(prepared_site.read_text())
    data["connection"] = {"superlink": f"127.0.0.1:{port}", "root-certificates": str(pki / "ca/ca.crt"),
                          "auth-key": str(pki / "sites/site0/site0.key")}
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    out = prepared_site.parent / f"preflight-{tmp_path.name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def _result(report, name: str):
    return next(r for r in report.results if r.name == name)


def test_ready_site_passes_every_check(prepared_site: Path, tmp_path: Path, pki: Path, tls_server: int,
                                       capsys: pytest.CaptureFixture) -> None:
    cfg = _site(prepared_site, tmp_path, pki, tls_server)
    report = run_preflight(cfg, min_free_gb=0.01)
    assert report.ok, report.render()
    assert [r.name for r in report.results] == ["config", "input", "cache-disk", "device", "cache", "superlink",
                                                "node-key", "privacy"]
    assert _result(report, "privacy").ok is None  # DP off: skipped, not failed
    assert "2 scans accepted" in _result(report, "cache").message
    assert "certificate verified with ca.crt" in _result(report, "superlink").message
    assert main(["site", "preflight", "--config", str(cfg), "--min-free-gb", "0.01"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 7 and "preflight passed" in out


def test_bad_config_stops_early_with_the_key(prepared_site: Path, tmp_path: Path, pki: Path) -> None:
    cfg = _site(prepared_site, tmp_path, pki, 1, training={"device": "tpu"})
    report = run_preflight(cfg)
    assert not report.ok and [r.name for r in report.results] == ["config"]
    assert "'training'" in report.results[0].message and "device" in report.results[0].message


def test_a_cache_windowed_otherwise_than_the_models_fails_the_config_check(prepared_site: Path, tmp_path: Path,
                                                                         pki: Path) -> None:
    cfg = _site(prepared_site, tmp_path, pki, 1, preprocess={"hu-min": -1200.0, "hu-max": 400.0})
    report = run_preflight(cfg)
    assert not report.ok and [r.name for r in report.results] == ["config"]
    message = report.results[0].message
    assert "preprocess hu-min/hu-max are -1200/400" in message and "windowed to -1000/200 HU" in message
    assert "set hu-min: -1000 and hu-max: 200" in message


def test_every_problem_is_collected(prepared_site: Path, tmp_path: Path, pki: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    """Missing input, missing cache, unreachable server, missing key: four FAIL lines, exit status 1."""
    closed_port = _closed_port()
    cfg = _site(prepared_site, tmp_path, pki, closed_port,
                data={"input": str(tmp_path / "no-export"), "cache": str(tmp_path / "empty-cache")},
                connection={"auth-key": str(tmp_path / "missing.key")})
    assert main(["site", "preflight", "--config", str(cfg), "--min-free-gb", "0.01"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  input       input {tmp_path / 'no-export'} does not exist" in out
    assert "FAIL  cache       no prepared cache" in out and "fix: run `lungmae site prepare" in out
    assert f"FAIL  superlink   127.0.0.1:{closed_port} refused the connection" in out
    assert "FAIL  node-key" in out and "as it does not exist" in out
    assert "preflight failed: 4 problem(s): input, cache, superlink, node-key" in out


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("datacard", "data card"),
        ("sample", "1 of 2 accepted samples are missing"),
        ("preprocess", "prepared with other preprocessing settings"),
    ],
)
def test_broken_cache_is_reported(prepared_site: Path, tmp_path: Path, pki: Path, tls_server: int,
                                  problem: str, message: str) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(prepared_site.parent / "cache", cache)
    changes: dict = {"data": {"cache": str(cache)}}
    if problem == "datacard":
        (cache / "datacard.json").write_text("{")
    elif problem == "sample":
        next((cache / "samples").glob("*.npz")).unlink()
    else:
        changes["preprocess"] = {"margin-mm": 12.0}
    report = run_preflight(_site(prepared_site, tmp_path, pki, tls_server, **changes), min_free_gb=0.01)
    assert _result(report, "cache").ok is False
    assert message in _result(report, "cache").message


def test_requested_gpu_missing_or_disk_full(prepared_site: Path, tmp_path: Path, pki: Path, tls_server: int) -> None:
    import torch

    cfg = _site(prepared_site, tmp_path, pki, tls_server, training={"device": "cuda"})
    report = run_preflight(cfg, min_free_gb=1e9)
    disk = _result(report, "cache-disk")
    assert disk.ok is False and "need 1e+09 GB" in disk.message
    device = _result(report, "device")
    if torch.cuda.is_available():
        assert device.ok is True and "GPU 0" in device.message
    else:
        assert device.ok is False and "no CUDA GPU is visible" in device.message


def test_wrong_ca_and_wrong_name_are_told_apart(pki: Path, tls_server: int, tmp_path: Path) -> None:
    from server.ops.certs import make_ca

    _, other_ca = make_ca(tmp_path / "other")
    wrong_ca = tls_probe(f"127.0.0.1:{tls_server}", other_ca)
    assert wrong_ca.ok is False and "its certificate is not signed by the CA" in wrong_ca.message
    ok = tls_probe(f"localhost:{tls_server}", pki / "ca/ca.crt")
    assert ok.ok is True
    plain = _plain_server()
    try:
        result = tls_probe(f"127.0.0.1:{plain.getsockname()[1]}", pki / "ca/ca.crt", timeout_s=2)
    finally:
        plain.close()
    assert result.ok is False and ("TLS handshake failed" in result.message or "no answer" in result.message)


@pytest.fixture(scope="module")
def mtls_server(pki: Path) -> Iterator[int]:
    """A TLS server that requires a client certificate signed by the consortium CA (as the site proxy does)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca/ca.crt"))
    context.load_cert_chain(pki / "server/server.pem", pki / "server/server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    yield from _serve_tls(context, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


def test_a_server_that_wants_a_client_certificate_is_told_apart(pki: Path, mtls_server: int,
                                                                   tmp_path: Path) -> None:
    """TLS 1.3 completes the client's handshake before the server judges its certificate: the probe's request
    is what brings the refusal to light, with the fix for a missing and for a refused certificate."""
    from server.ops.certs import make_ca

    address, ca = f"localhost:{mtls_server}", pki / "ca/ca.crt"
    site = (pki / "sites/site0/site0.client.pem", pki / "sites/site0/site0.client.key")
    ok = tls_probe(address, ca, client_certificate=site[0], client_key=site[1])
    assert ok.ok is True and "client certificate site0.client.pem presented" in ok.message, ok.message
    missing = tls_probe(address, ca, timeout_s=5)
    assert missing.ok is False and "wants a TLS client certificate and none is set" in missing.message, missing
    assert "trust: client-certificate" in missing.hint
    # a certificate of another CA (another consortium's, or a self-made one)
    other_key, other_ca = make_ca(tmp_path / "other")
    refused = tls_probe(address, ca, timeout_s=5, client_certificate=other_ca, client_key=other_key)
    assert refused.ok is False and "refused this site's client certificate" in refused.message, refused
    unreadable = tls_probe(address, ca, client_certificate=tmp_path / "nope.pem", client_key=tmp_path / "nope.key")
    assert unreadable.ok is False and "cannot be loaded" in unreadable.message


def test_privacy_ledger_budget(prepared_site: Path, tmp_path: Path, pki: Path, tls_server: int) -> None:
    ledger = tmp_path / "ledger.json"
    cfg = _site(prepared_site, tmp_path, pki, tls_server,
                privacy={"enabled": True, "epsilon": 4.0, "noise-multiplier": 1.0, "ledger": str(ledger)})
    fresh = _result(run_preflight(cfg, min_free_gb=0.01), "privacy")
    assert fresh.ok is True and "new ledger" in fresh.message and "4 left" in fresh.message
    ledger.write_text(json.dumps({"format": "something-else"}))
    broken = _result(run_preflight(cfg, min_free_gb=0.01), "privacy")
    assert broken.ok is False and str(ledger) in broken.message and "never delete it" in broken.hint


def test_privacy_default_ledger_is_read_from_the_state_dir(prepared_site: Path, tmp_path: Path, pki: Path,
                                                           tls_server: int) -> None:
    """Without ``privacy.ledger`` the ledger is ``<state-dir>/privacy-ledger.json``, never one in the cache."""
    from client.site_config import load_site_config

    cfg = _site(prepared_site, tmp_path, pki, tls_server,
                privacy={"enabled": True, "epsilon": 4.0, "noise-multiplier": 1.0})
    site = load_site_config(cfg)
    state_ledger = Path(site.site.state_dir) / "privacy-ledger.json"
    cache_ledger = Path(site.data.cache) / "privacy-ledger.json"
    cache_ledger.write_text(json.dumps({"format": "in-the-cache"}))
    try:
        assert _result(run_preflight(cfg, min_free_gb=0.01), "privacy").ok is True  # the cache's file is ignored
        state_ledger.parent.mkdir(parents=True, exist_ok=True)
        state_ledger.write_text(json.dumps({"format": "something-else"}))
        broken = _result(run_preflight(cfg, min_free_gb=0.01), "privacy")
        assert broken.ok is False and str(state_ledger) in broken.message
    finally:
        cache_ledger.unlink()
        state_ledger.unlink(missing_ok=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _plain_server() -> socket.socket:
    """A listener that never speaks TLS (accepts into the backlog and stays silent)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock
