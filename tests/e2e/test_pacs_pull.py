"""`lungmae site pull` against a real Orthanc with its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb).

The test starts Orthanc on a free loopback port with a temporary configuration and storage folder, uploads a
synthetic hospital (CT studies, their scouts, a dose screen of modality OT), an MR study and a series whose
instances are not all CT, then pulls: the CT series arrive whole, the cache prepared from them matches the
cache of the same files imported as a folder, a second pull fetches nothing. Failures: Orthanc down, a series
deleted between query and retrieval (404), a server that stalls mid-transfer (timeout, then a resumed pull).
Every failure must leave no partial file in the import folder.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.pacs_config import PacsSection
from client.pacs_pull import PacsError, PacsPuller, staging_dir
from client.prepare import prepare_site
from client.site_config import site_config_from_mapping, write_site_config
from lungmae_cli.main import main
from lungmae_core.manifest import read_manifest
from lungmae_core.synthetic.dicom_writer import write_site

pytestmark = pytest.mark.slow

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SHAPE = (40, 64, 64)
SINCE = "2000-01-01"

if not (os.access(ORTHANC, os.X_OK) and DICOMWEB_PLUGIN.exists()):
    pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Orthanc gets SIGTERM if pytest dies without its teardown (a hard timeout): no server is left behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http(method: str, url: str, data: bytes | None = None) -> dict | list:
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/dicom"} if data else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if body else {}


class Orthanc:
    """One Orthanc process on 127.0.0.1 with a temporary storage folder; stopped by :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        root.mkdir(parents=True)
        config = {"Name": "lungmae-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "HttpPort": self.port, "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomServerEnabled": False, "DicomPort": _free_port(),
                  "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self.rest = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.rest}/dicom-web"
        deadline = time.monotonic() + 30
        while True:
            try:
                _http("GET", f"{self.rest}/system")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start; see {root / 'orthanc.log'}") from None
                time.sleep(0.2)

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            _http("POST", f"{self.rest}/instances", path.read_bytes())

    def delete_series(self, series_uid: str) -> None:
        found = _http("POST", f"{self.rest}/tools/lookup", series_uid.encode())
        (series,) = [f for f in found if f["Type"] == "Series"]
        _http("DELETE", f"{self.rest}/series/{series['ID']}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class StallingProxy:
    """A TCP proxy to Orthanc that forwards everything but, for WADO-RS series retrievals, only the first bytes
    of the answer, then stalls: a PACS that hangs in the middle of a transfer."""

    def __init__(self, target_port: int, stall_after: int = 200_000) -> None:
        self.target_port, self.stall_after = target_port, stall_after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop_event.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(("127.0.0.1", self.target_port)) as up:
            stall, sent = False, 0
            while not self.stop_event.is_set():
                ready, _, _ = select.select([conn, up], [], [], 0.2)
                if conn in ready:
                    data = conn.recv(65536)
                    if not data:
                        return
                    line = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
                    path = line[1] if len(line) > 1 else ""
                    # /dicom-web/studies/<uid>/series/<uid>: a WADO-RS series retrieval (not a QIDO search)
                    stall = path.count("/") == 5 and "/series/" in path and "?" not in path
                    sent = 0
                    up.sendall(data)
                if up in ready:
                    chunk = up.recv(65536)
                    if not chunk:
                        return
                    if stall and sent + len(chunk) > self.stall_after:
                        conn.sendall(chunk[: max(0, self.stall_after - sent)])
                        self.stop_event.wait()  # hang until the test ends
                        return
                    conn.sendall(chunk)
                    sent += len(chunk)

    def close(self) -> None:
        self.stop_event.set()
        self.sock.close()
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Orthanc holding 3 synthetic CT studies (+ scouts, a dose screen), an MR study and a mixed CT/MR series."""
    root = tmp_path_factory.mktemp("pacs")
    site = write_site(root / "synth", site_index=0, n_scans=3, seed=4, shape=SHAPE)
    orthanc = Orthanc(root / "orthanc")
    try:
        orthanc.upload(sorted(p for p in site.dicom_dir.rglob("*.dcm")))
        # An MR study: a CT file rewritten as MR with its own UIDs.
        src = sorted(site.scans[0].series_dir.glob("*.dcm"))
        mr = pydicom.dcmread(src[0])
        mr.Modality, mr.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID = "2.25.901", "2.25.902", "2.25.903"
        mr.file_meta.MediaStorageSOPClassUID, mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPClassUID, "2.25.903"
        mr.save_as(root / "mr.dcm")
        # A series listed as CT (its first instance is CT) whose second instance is MR.
        mixed = []
        for k, path in enumerate(src[:2]):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.911", "2.25.912"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.913{k}"
            if k == 1:
                ds.Modality = "MR"
            ds.save_as(root / f"mixed{k}.dcm")
            mixed.append(root / f"mixed{k}.dcm")
        orthanc.upload([root / "mr.dcm"])
        orthanc.upload(mixed)
        yield {"orthanc": orthanc, "site": site, "root": root}
    finally:
        orthanc.stop()


def _site_yaml(root: Path, url: str, **pacs: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    secret = root.parent / "site-secret.key"
    if not secret.exists():
        secret.write_text("6b" * 32 + "\n")
    cfg = site_config_from_mapping({
        "site": {"name": "pulled"},
        "data": {"input": str(root / "import"), "cache": str(root / "cache"), "min-slices": 16,
                 "secret-file": str(secret)},
        "preprocess": {"size": 32},
        "pacs": {"url": url, "since": SINCE, "timeout-s": 5, "retries": 1, **pacs},
    })
    return write_site_config(cfg, root / "site.yaml")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _no_partial(import_dir: Path) -> None:
    """No temporary file anywhere; every series folder in the import folder is complete (its files all CT)."""
    assert not [p for p in import_dir.parent.rglob("*.tmp")]
    for series in (import_dir / "pacs").glob("*/*") if (import_dir / "pacs").exists() else []:
        files = sorted(series.iterdir())
        assert files, series
        assert {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files} == {"CT"}


def test_pull_then_prepare_matches_a_folder_import(pacs: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    site_yaml = _site_yaml(tmp_path / "site", pacs["orthanc"].dicomweb)
    assert main(["site", "pull", "--config", str(site_yaml), "--no-progress"]) == 1  # the mixed series fails
    out = capsys.readouterr().out
    assert "Failed (1 series" in out and "an instance is modality MR" in out
    assert "4 studies" in out  # 3 synthetic CT studies + the mixed one; the MR study is not listed
    assert "series of modality OT, not CT" in out  # the dose screen
    assert "Pulled 6 series" in out  # 3 CT series + 3 scouts (CT localizers: prepare rejects them)

    import_dir = tmp_path / "site" / "import"
    pulled = {p.name: sorted(f.name for f in p.iterdir()) for p in (import_dir / "pacs").glob("*/*")}
    for scan in pacs["site"].scans:
        expected = sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID + ".dcm"
                          for f in scan.series_dir.glob("*.dcm"))
        assert pulled[scan.series_uid] == expected
    assert "2.25.912" not in pulled and "2.25.902" not in pulled
    _no_partial(import_dir)
    assert not staging_dir(import_dir).exists()
    modes = {f.stat().st_mode & 0o777 for f in _files(import_dir)}
    assert modes == {0o600}

    # A second pull: nothing new, nothing fetched.
    assert main(["site", "pull", "--config", str(site_yaml), "--no-progress"]) == 1
    assert "6 series already pulled, 1 to fetch" in capsys.readouterr().out  # only the refused one again

    # Prepare from the pull and from the same studies' original files as a folder import: same samples.
    report = prepare_site(site_config_from_mapping(
        {"data": {"input": str(import_dir), "cache": str(tmp_path / "site" / "cache"), "min-slices": 16,
                  "secret-file": str(tmp_path / "site-secret.key")}, "preprocess": {"size": 32}}), progress=False)
    folder = tmp_path / "folder"
    for scan in pacs["site"].scans:
        shutil.copytree(scan.series_dir, folder / scan.series_uid)
    reference = prepare_site(site_config_from_mapping(
        {"data": {"input": str(folder), "cache": str(tmp_path / "ref-cache"), "min-slices": 16,
                  "secret-file": str(tmp_path / "site-secret.key")}, "preprocess": {"size": 32}}), progress=False)
    assert report.accepted == reference.accepted == 3
    pulled_rows = {r.series_id: r for r in read_manifest(tmp_path / "site" / "cache") if r.accepted}
    ref_rows = {r.series_id: r for r in read_manifest(tmp_path / "ref-cache") if r.accepted}
    assert pulled_rows.keys() == ref_rows.keys()
    for key, row in pulled_rows.items():
        with np.load(tmp_path / "site" / "cache" / row.cache_file) as a, \
                np.load(tmp_path / "ref-cache" / ref_rows[key].cache_file) as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name])


def test_orthanc_down_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site_yaml = _site_yaml(tmp_path / "site", f"http://127.0.0.1:{_free_port()}/dicom-web")
    assert main(["site", "pull", "--config", str(site_yaml), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Unable to reach the PACS at http://127.0.0.1:" in err and "is the DICOMweb server running" in err
    assert _files(tmp_path / "site" / "import") == []


def test_series_gone_between_query_and_retrieval_is_reported_and_others_pulled(pacs: dict, tmp_path: Path) -> None:
    orthanc = pacs["orthanc"]
    puller = PacsPuller(PacsSection(url=orthanc.dicomweb, timeout_s=5, retries=1), tmp_path / "import",
                        progress=False)
    plan = puller.plan(None)
    gone = pacs["site"].scans[2]
    series = [s for s in plan.to_fetch if s.series_uid == gone.series_uid]
    assert series
    orthanc.delete_series(gone.series_uid)
    try:
        report = puller.fetch(plan)
    finally:
        orthanc.upload(sorted(gone.series_dir.glob("*.dcm")))  # back, for the other tests
    failed = {ref.series_uid: why for ref, why in report.failed}
    assert "404" in failed[gone.series_uid] and "deleted or moved since the query" in failed[gone.series_uid]
    assert "2.25.912" in failed and "modality MR" in failed["2.25.912"] and "skipped whole" in failed["2.25.912"]
    assert report.pulled_series == len(plan.to_fetch) - 2
    assert not (tmp_path / "import" / "pacs" / gone.study_uid / gone.series_uid).exists()
    assert not (tmp_path / "import" / "pacs" / "2.25.911").exists()
    _no_partial(tmp_path / "import")
    assert "Failed (2 series" in report.summary()


def test_stalled_transfer_times_out_leaves_nothing_partial_and_resumes(pacs: dict, tmp_path: Path) -> None:
    orthanc = pacs["orthanc"]
    proxy = StallingProxy(orthanc.port)
    import_dir = tmp_path / "import"
    try:
        slow = PacsPuller(PacsSection(url=f"http://127.0.0.1:{proxy.port}/dicom-web", timeout_s=2, retries=1),
                          import_dir, progress=False)
        plan = slow.plan(None)
        t0 = time.monotonic()
        with pytest.raises(PacsError, match=r"did not answer within 2 s while retrieving a series \(pacs.timeout-s\)"):
            slow.fetch(plan)
        assert time.monotonic() - t0 < 30
    finally:
        proxy.close()
    _no_partial(import_dir)
    complete = {p.name for p in (import_dir / "pacs").glob("*/*")}
    stalled = [s for s in plan.to_fetch if (staging_dir(import_dir) / s.series_uid).is_dir()]
    assert len(stalled) == 1 and stalled[0].series_uid not in complete  # it never reached the import folder
    staged = _files(staging_dir(import_dir))
    assert staged, "the instances that arrived whole before the stall are kept for the next pull"

    fast = PacsPuller(PacsSection(url=orthanc.dicomweb, timeout_s=5, retries=1), import_dir, progress=False)
    resumed_plan = fast.plan(None)
    assert resumed_plan.already_pulled == len(complete)
    report = fast.fetch(resumed_plan)
    assert report.files_resumed == len(staged)
    assert report.pulled_series == len(resumed_plan.to_fetch) - 1  # all but the mixed CT/MR series
    assert (import_dir / "pacs" / stalled[0].study_uid / stalled[0].series_uid).is_dir()
    _no_partial(import_dir)


def test_configuration_errors_are_specific(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site_yaml = _site_yaml(tmp_path / "site", "http://127.0.0.1:1/dicom-web")
    assert main(["site", "pull", "--config", str(site_yaml), "--since", "31/12/2024"]) == 2
    assert "--since must be a date as YYYY-MM-DD or YYYYMMDD; got '31/12/2024'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pacs:\n  url: ftp://pacs\n")
    assert main(["site", "pull", "--config", str(bad)]) == 2
    assert "'url' must be the DICOMweb root" in capsys.readouterr().err
