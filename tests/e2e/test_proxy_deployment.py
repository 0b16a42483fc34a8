"""Least exposure and approved code, on real processes: nginx (mutual TLS, Fleet only) in front of a SuperLink
that binds loopback, a site in a second network namespace, a signed app bundle and a tampered one.

1. `lungmae certs` makes the PKI (server certificate for the proxy's address, per-site client certificates,
   the app-signing key); `lungmae server start --proxy-listen` runs the SuperLink on 127.0.0.1 in process
   isolation with its SuperExec secret, flower-superexec, and nginx on a non-loopback address.
2. On the server host, ServerAppIo's AcquireTask without the SuperExec secret is refused (401). From the
   site's network namespace (a veth pair; where namespaces cannot be made, a second loopback
   address, and the test says so): the SuperLink's own port is unreachable; a Fleet call with a site
   certificate reaches Flower; a Control or Runtime call with a site certificate is refused by the proxy;
   a call without a client certificate is refused; a site's certificate stops working once revoked; the
   preflight probe passes with the site's certificate and names the fix without one or with a revoked one.
3. A real SuperNode in the namespace joins through the proxy with its certificate, and `lungmae server run
   --signing-key` completes one round of the tiny model; the site's own chained log records the accepted
   bundle and `lungmae audit verify` accepts both logs.
4. The same app with one byte changed, submitted with the original signature, is refused at the site before
   any of it is installed: the refusal is in the site's log and in the SuperNode's output.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.processes import free_port, tagged_pids, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
    pytest.skip("nginx is not installed (apt-get install nginx)", allow_module_level=True)

TAG = f"lungmae-proxy-{uuid.uuid4().hex[:12]}"
LUNGMAE = [sys.executable, "-m", "lungmae_cli.main"]

REPO = Path(__file__).resolve().parents[2]

PROBE = r'''
import http.client, ssl, sys
host, port, path, ca, cert, key = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)
try:
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
    resp = conn.getresponse()
    print(resp.status, resp.read(300).decode(errors="replace").replace("\n", " "))
except (OSError, ssl.SSLError) as exc:
    print("ERR", type(exc).__name__, exc)
'''





class Network:
    """A second network namespace joined to this one by a veth pair, or a loopback alias where impossible."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.ns, self.veth = f"lmq{suffix}", f"lmq{suffix}"
        octet = 16 + os.getpid() % 200
        self.host_ip, self.site_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.isolated = False
        self.reason = ""
        steps = [["ip", "netns", "add", self.ns],
                 ["ip", "link", "add", f"{self.veth}a", "type", "veth", "peer", "name", f"{self.veth}b"],
                 ["ip", "link", "set", f"{self.veth}b", "netns", self.ns],
                 ["ip", "addr", "add", f"{self.host_ip}/30", "dev", f"{self.veth}a"],
                 ["ip", "link", "set", f"{self.veth}a", "up"],
                 ["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.site_ip}/30", "dev", f"{self.veth}b"],
                 ["ip", "netns", "exec", self.ns, "ip", "link", "set", f"{self.veth}b", "up"],
                 ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"]]
        if shutil.which("ip") is None:
            self.reason = "the `ip` command is missing"
        else:
            for step in steps:
                proc = subprocess.run(step, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    self.reason = f"`{' '.join(step)}` failed: {proc.stderr.strip()}"
                    self.close()
                    break
            else:
                self.isolated = True
        if not self.isolated:
            self.host_ip = "127.0.0.2"  # second-best: another address than the SuperLink's, same host

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns] if self.isolated else []

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", f"{self.veth}a"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)


class Processes:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.procs = root, env, {}

    def start(self, role: str, args: list[str], **env: str) -> subprocess.Popen:
        log = open(self.root / f"{role}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=dict(self.env, LUNGMAE_E2E_TAG=TAG, **env), stdout=log,
                                stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        log.close()
        self.procs[role] = proc
        return proc

    def log(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            pids = tagged_pids(TAG)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Processes, Network]]:
    from lungmae_cli._process import flower_env

    root = tmp_path_factory.mktemp("proxy-deploy")
    root.chmod(0o755)
    env = dict(flower_env(), FLWR_HOME=str(root / "flwr-home"), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    net = Network()
    procs = Processes(root, env)
    try:
        yield procs, net
    finally:
        procs.stop_all()
        net.close()
        assert not tagged_pids(TAG), "processes of the test federation survived teardown"


def _probe(procs: Processes, net: Network, port: int, path: str, cert: str = "-", key: str = "-",
           host: str | None = None, from_site: bool = True) -> str:
    """POST ``path`` from the site's namespace (or, ``from_site=False``, from the server host)."""
    pki = procs.root / "pki"
    prefix = net.prefix() if from_site else []
    out = procs.run([*prefix, sys.executable, "-c", PROBE, host or net.host_ip, str(port), path,
                     str(pki / "ca/ca.crt"), cert, key], timeout=60)
    return out.stdout.strip() or out.stderr.strip()


def test_fleet_only_mtls_proxy_and_signed_apps(setup: tuple[Processes, Network]) -> None:
    procs, net = setup
    root = procs.root
    if not net.isolated:
        print(f"no second network namespace ({net.reason}); the site uses {net.host_ip} instead")
    link_port, proxy_port, node_port = free_port(), free_port(), free_port()

    # 1. PKI, federation.yaml, server with proxy --------------------------------------------------------------
    certs = procs.run([*LUNGMAE, "certs", "--out", "pki", "--server-name", "localhost", "--server-ip", net.host_ip,
                       "--site", "s0", "--site", "s2"])
    assert certs.returncode == 0, certs.stderr
    pki = root / "pki"
    (root / "federation.yaml").write_text(yaml.safe_dump({
        "model": {"name": "tiny", "overrides": {"img-size": 32}},
        "phases": {"pretrain": {"rounds": 1, "local-epochs": 1, "min-sites": 1, "evaluate-every": 0},
                   "finetune": {"rounds": 0}},
        "round-timeout-s": 120, "run-dir": str(root / "run"),
        "server": {"superlink": f"127.0.0.1:{link_port}", "root-certificates": "pki/ca/ca.crt",
                   "certificate": "pki/server/server.pem", "private-key": "pki/server/server.key"}}))
    procs.start("server", [*LUNGMAE, "server", "start", "--config", "federation.yaml", "--database",
                           "state/superlink.db", "--proxy-listen", f"{net.host_ip}:{proxy_port}"])

    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from lungmae_cli.synth import write_synthetic_sites

    synthetic = write_synthetic_sites(root / "sites", sites=1, scans_per_site=2, seed=5, shape=(40, 64, 64),
                                      labelled_fraction=0.0, preprocess_size=32, workers=1)[0]
    prepare_site(load_site_config(synthetic))
    data = yaml.safe_load(synthetic.read_text())
    data["connection"] = {"superlink": f"{net.host_ip}:{proxy_port}", "root-certificates": str(pki / "ca/ca.crt"),
                          "auth-key": str(pki / "sites/s0/s0.key"), "node-port": node_port}
    data["trust"] = {"trusted-keys": [str(pki / "sites/s0/fab-signing.pub")],
                     "client-certificate": str(pki / "sites/s0/s0.client.pem"),
                     "client-key": str(pki / "sites/s0/s0.client.key")}
    data["training"]["max-local-epochs"] = 1
    site_yaml = synthetic.parent / "deploy.yaml"
    site_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    site_log = synthetic.parent / "state" / "site-audit.jsonl"

    wait_for("the SuperLink", lambda: "Uvicorn running on https://127.0.0.1" in procs.log("server"), 120)
    s0 = (str(pki / "sites/s0/s0.client.pem"), str(pki / "sites/s0/s0.client.key"))
    s2 = (str(pki / "sites/s2/s2.client.pem"), str(pki / "sites/s2/s2.client.key"))
    wait_for("the proxy", lambda: not _probe(procs, net, proxy_port, "/v1/fleet/get-run", *s0).startswith("ERR"), 60)

    # 2. what the network sees ----------------------------------------------------------------------------------
    direct = _probe(procs, net, link_port, "/v1/control/list-runs", host=net.host_ip)
    assert direct.startswith("ERR"), f"the SuperLink port answers on {net.host_ip}: {direct}"
    # on the server host itself, ServerAppIo's AcquireTask needs the SuperExec secret (process isolation)
    acquire = _probe(procs, net, link_port, "/v1/runtime/acquire-task", host="127.0.0.1", from_site=False)
    assert acquire.startswith("401") and "Authentication failed" in acquire, acquire
    fleet = _probe(procs, net, proxy_port, "/v1/fleet/get-run", *s0)
    assert fleet.split()[0] not in ("400", "403", "404") and not fleet.startswith("ERR"), fleet  # Flower answered
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/acquire-task",
                 "/v1/fleet/register-node"):
        refused = _probe(procs, net, proxy_port, path, *s0)
        assert refused.startswith("403 only the Flower Fleet API is served here"), (path, refused)
    no_cert = _probe(procs, net, proxy_port, "/v1/fleet/get-run")
    assert no_cert.startswith("400") and "No required SSL certificate was sent" in no_cert, no_cert
    before = _probe(procs, net, proxy_port, "/v1/fleet/get-run", *s2)
    assert before.split()[0] == fleet.split()[0], before
    revoke = procs.run([*LUNGMAE, "certs", "--out", "pki", "--revoke", "s2"])
    assert revoke.returncode == 0 and "revoked          s2" in revoke.stdout, revoke.stdout + revoke.stderr
    nginx_pid = int((root / "state/proxy/nginx.pid").read_text())
    os.kill(nginx_pid, signal.SIGHUP)  # nginx -s reload: re-reads the CRL
    wait_for("the revocation to apply", lambda: _probe(procs, net, proxy_port, "/v1/fleet/get-run", *s2)
              .startswith("400"), 30)
    assert "The SSL certificate error" in _probe(procs, net, proxy_port, "/v1/fleet/get-run", *s2)
    assert _probe(procs, net, proxy_port, "/v1/fleet/get-run", *s0).split()[0] == fleet.split()[0]
    # `lungmae site preflight`'s probe tells the three apart through the real proxy
    from client.preflight import tls_probe

    ca, proxy = pki / "ca/ca.crt", f"{net.host_ip}:{proxy_port}"
    good = tls_probe(proxy, ca, client_certificate=Path(s0[0]), client_key=Path(s0[1]))
    assert good.ok and "client certificate s0.client.pem presented" in good.message, good
    without = tls_probe(proxy, ca)
    assert not without.ok and "wants a TLS client certificate and none is set" in without.message, without
    revoked = tls_probe(proxy, ca, client_certificate=Path(s2[0]), client_key=Path(s2[1]))
    assert not revoked.ok and "refused this site's client certificate" in revoked.message, revoked

    # 3. a real SuperNode through the proxy; a signed run completes --------------------------------------------
    register = procs.run(["flwr", "supernode", "register", str(pki / "sites/s0/s0.pub"), "lungmae", "--name", "s0",
                          "--format", "json"])
    assert '"success": true' in register.stdout, register.stdout + register.stderr
    site_home = root / "site-flwr-home"  # where the site's ClientApp processes install accepted bundles
    procs.start("site0", [*net.prefix(), *LUNGMAE, "site", "start", "--config", str(site_yaml)],
                FLWR_HOME=str(site_home))
    runner = procs.run([*LUNGMAE, "server", "run", "--config", "federation.yaml", "--poll-s", "2", "--app", str(REPO),
                        "--signing-key", str(pki / "signing/fab-signing.key")], timeout=420)
    assert runner.returncode == 0, runner.stdout[-3000:] + procs.log("site0")[-3000:]
    assert "Receiving: train message" in procs.log("site0")
    events = [json.loads(line) for line in site_log.read_text().splitlines()]
    fab_events = [e for e in events if e["event"].startswith("fab-")]
    assert fab_events and all(e["event"] == "fab-accepted" and e["reason"] == "signed by fab-signing.pub"
                              for e in fab_events), events
    assert any(e["event"] == "released" and e["message_type"] == "train" for e in events), events  # what left
    verify = procs.run([*LUNGMAE, "audit", "verify", "run", str(site_log), "--public-key",
                        str(pki / "server/audit-signing.pub")])
    assert verify.returncode == 0 and "1 signatures checked" in verify.stdout, verify.stdout + verify.stderr
    access = (root / "state/proxy/access.log").read_text()
    assert "/v1/fleet/push-messages" in access and (net.site_ip if net.isolated else net.host_ip) in access

    # 4. one changed byte, same signature: refused at the site before anything is installed -------------------
    app = root / "tampered-app"
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                             ".pytest_cache", "runs", ".flwr"))
    target = app / "client" / "__init__.py"
    original = target.read_bytes()
    at = next(i for i in range(original.index(b'"""') + 3, len(original)) if chr(original[i]).isalpha())
    target.write_bytes(original[:at] + bytes([original[at] ^ 0x20]) + original[at + 1:])  # one letter's case
    from flwr.cli.build import build_fab_from_disk

    from lungmae_core.signing import fab_sha256, sign_fab

    good_fab, bad_fab = build_fab_from_disk(REPO), build_fab_from_disk(app)
    with zipfile.ZipFile(io.BytesIO(good_fab)) as good, zipfile.ZipFile(io.BytesIO(bad_fab)) as bad:
        assert good.namelist() == bad.namelist()
        changed = [n for n in good.namelist() if good.read(n) != bad.read(n)]
        assert changed in (["client/__init__.py"], ["client/__init__.py", ".info/CONTENT"]), changed
    signature = sign_fab(good_fab, pki / "signing/fab-signing.key")
    tampered_sha = fab_sha256(bad_fab)
    submit = procs.run(["flwr", "run", str(app), "lungmae", "--format", "json", "--run-config",
                        f"federation-config={json.dumps(str(root / 'federation.yaml'))} "
                        f"run-dir={json.dumps(str(root / 'run-tampered'))} fab-signature={json.dumps(signature)}"])
    assert '"success": true' in submit.stdout, submit.stdout + submit.stderr
    wait_for("the site to refuse the tampered bundle", lambda: "fab-refused" in site_log.read_text(), 180)
    refusal = [json.loads(line) for line in site_log.read_text().splitlines()][-1]
    assert refusal["event"] == "fab-refused" and refusal["fab_sha256"] == tampered_sha, refusal
    assert "its signature does not verify with any trusted key" in refusal["reason"], refusal
    assert f"app bundle sha256 {tampered_sha} refused" in procs.log("site0")
    assert site_home.is_dir() and not list(site_home.glob(f"**/*{tampered_sha[:8]}*")), "the bundle was installed"
    assert procs.run([*LUNGMAE, "audit", "verify", str(site_log)]).returncode == 0
