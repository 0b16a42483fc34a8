"""`lungmae site preflight`: is this hospital ready to join the federation? One pass/fail line per check.

Like Opacus' ``ModuleValidator.validate``, every check runs and every problem is collected, so hospital IT
sees the whole list at once, each with a hint that says what to do. Checks, in order:

1. ``config``       site.yaml is valid
2. ``input``        the DICOM/NIfTI input is readable
3. ``cache-disk``   the cache directory is writable and has enough free disk
4. ``device``       the GPU named in ``training: device`` is visible (or the CPU fallback is stated)
5. ``cache``        the prepared cache is there: manifest, data card, accepted samples on disk, and made with
                    the current preprocessing settings
6. ``superlink``    the SuperLink answers a real TLS handshake verified with ``connection: root-certificates``,
                    and a mutual-TLS proxy in front of it accepts ``trust: client-certificate``
7. ``node-key``     ``connection: auth-key`` is an ECDSA private key Flower can use
8. ``privacy``      the privacy ledger is readable, and the budget left (DP sites only)

Nothing here sends data anywhere: the SuperLink check opens a TLS connection, asks for ``/`` and closes it.

Examples:
    >>> report = run_preflight(Path("site.yaml"))
    >>> print(report.render()); report.ok
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CheckResult", "PreflightReport", "run_preflight", "tls_probe"]

DEFAULT_MIN_FREE_GB = 5.0


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One line of the preflight report.

    Args:
        name: short check name (``config``, ``superlink``, ...).
        ok: passed (True), failed (False), or skipped (None, e.g. no DP configured).
        message: what was found.
        hint: what to do about it (failures only).
    """

    name: str
    ok: bool | None
    message: str
    hint: str = ""

    def render(self) -> str:
        """``PASS  superlink   ...`` / ``FAIL ...`` followed by an indented ``fix:`` line."""
        tag = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        line = f"{tag}  {self.name:<11} {self.message}"
        return line + (f"\n      fix: {self.hint}" if self.hint and self.ok is False else "")


@dataclasses.dataclass
class PreflightReport:
    """All check results of one preflight run."""

    results: list[CheckResult] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(r.ok is not False for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks."""
        return [r for r in self.results if r.ok is False]

    def render(self) -> str:
        """The report as text: one line per check, then a summary line."""
        lines = [r.render() for r in self.results]
        n_fail = len(self.failures)
        lines.append("preflight passed: this site is ready to join" if n_fail == 0 else
                     f"preflight failed: {n_fail} problem(s): {', '.join(r.name for r in self.failures)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {"ok": self.ok, "checks": [dataclasses.asdict(r) for r in self.results]}


# --------------------------------------------------------------------------------------------- checks
def _check_config(path: Path) -> tuple[CheckResult, Any]:
    from client.site_config import load_site_config, require_model_window
    from lungmae_core.errors import ConfigError

    try:
        cfg = load_site_config(path)
        require_model_window(cfg)
    except ConfigError as exc:
        return CheckResult("config", False, str(exc), "fix the key named above (docs/site-data.md lists every "
                                                      "key of site.yaml)"), None
    return CheckResult("config", True, f"{path} is valid (site '{cfg.site.name}')"), cfg


def _check_input(cfg: Any) -> CheckResult:
    path = cfg.data.input
    if path is None:
        return CheckResult("input", None, "data: 'input' is not set (only needed to prepare the cache)")
    if not path.exists():
        return CheckResult("input", False, f"input {path} does not exist",
                           "mount the DICOM/NIfTI export there or correct data: 'input' in site.yaml")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return CheckResult("input", False, f"input {path} is not readable by this user",
                           f"grant read access to the service user (e.g. `setfacl -R -m u:$USER:rX {path}`)")
    if path.is_dir():
        n = 0
        try:
            for _root, _dirs, files in os.walk(path):
                n += len(files)
                if n:
                    break
        except OSError as exc:
            return CheckResult("input", False, f"input {path} cannot be listed: {exc.strerror}",
                               "check the mount and its permissions")
        if n == 0:
            return CheckResult("input", False, f"input {path} is an empty directory",
                               "export the CT series there (DICOM files or .nii/.nii.gz)")
    return CheckResult("input", True, f"input {path} is readable")


def _check_cache_disk(cfg: Any, min_free_gb: float) -> CheckResult:
    cache = cfg.data.cache
    if cache is None:
        return CheckResult("cache-disk", False, "data: 'cache' is not set",
                           "set data: cache to a directory on a local disk with room for the prepared scans")
    probe_dir = cache if cache.exists() else next((p for p in cache.parents if p.exists()), Path("/"))
    try:
        if not cache.exists():
            cache.mkdir(parents=True)
        fd, tmp = tempfile.mkstemp(prefix=".preflight-", dir=cache)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return CheckResult("cache-disk", False, f"cache {cache} is not writable: {exc.strerror or exc}",
                           f"create it and give the service user write access (`chown -R $USER {probe_dir}`)")
    free_gb = shutil.disk_usage(cache).free / 1e9
    if free_gb < min_free_gb:
        return CheckResult("cache-disk", False, f"cache {cache} is writable but only {free_gb:.1f} GB are free "
                           f"(need {min_free_gb:g} GB)", "free disk space or move data: cache to a larger disk")
    return CheckResult("cache-disk", True, f"cache {cache} is writable, {free_gb:.1f} GB free")


def _check_device(cfg: Any) -> CheckResult:
    import torch

    wanted = cfg.training.device
    if wanted == "cpu":
        return CheckResult("device", True, "training on CPU as configured (training: device cpu)")
    if torch.cuda.is_available():
        index = int(wanted.split(":")[1]) if ":" in wanted else 0
        if index >= torch.cuda.device_count():
            return CheckResult("device", False, f"{wanted} requested but only {torch.cuda.device_count()} GPU(s) "
                               "are visible", "set training: device to cuda:0 or check CUDA_VISIBLE_DEVICES")
        props = torch.cuda.get_device_properties(index)
        return CheckResult("device", True, f"GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    if wanted == "auto":
        return CheckResult("device", True, "no GPU visible: training falls back to the CPU (much slower; fine for "
                                           "the tiny model)")
    return CheckResult("device", False, f"training: device is {wanted} but no CUDA GPU is visible to PyTorch "
                       f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
                       "install the NVIDIA driver and a CUDA build of torch, expose the GPU to the container "
                       "(--gpus all), or set training: device auto to accept the CPU")


def _check_cache(cfg: Any) -> CheckResult:
    from lungmae_core.errors import CacheError
    from lungmae_core.manifest import read_manifest

    cache = cfg.data.cache
    hint = "run `lungmae site prepare --config site.yaml` to build the cache"
    if cache is None or not (cache / "manifest.csv").exists():
        return CheckResult("cache", False, f"no prepared cache in {cache} (manifest.csv missing)", hint)
    try:
        rows = read_manifest(cache)
    except (CacheError, OSError, ValueError) as exc:
        return CheckResult("cache", False, f"manifest.csv in {cache} is unreadable: {exc}", hint)
    card_path = cache / "datacard.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return CheckResult("cache", False, f"data card {card_path} is missing or unreadable ({exc.__class__.__name__})",
                           hint)
    accepted = [r for r in rows if r.status == "accepted"]
    missing = [r for r in accepted if not (cache / r.cache_file).is_file()]
    if not accepted:
        return CheckResult("cache", False, f"the cache in {cache} has no accepted scan ({len(rows)} rejected)",
                           "read the 'reason' column of manifest.csv and fix the export, then prepare again")
    if missing:
        return CheckResult("cache", False, f"{len(missing)} of {len(accepted)} accepted samples are missing from "
                           f"{cache / 'samples'}", hint + " again (it rebuilds what is missing)")
    fingerprint = (card.get("preprocess") or {}).get("fingerprint")
    current = cfg.preprocess.fingerprint()
    if fingerprint and fingerprint != current:
        return CheckResult("cache", False, "the cache was prepared with other preprocessing settings than "
                           "site.yaml's 'preprocess' section now has", hint + " again")
    labelled = sum(1 for r in accepted if r.label)
    return CheckResult("cache", True, f"{len(accepted)} scans accepted ({labelled} labelled), data card present")


#: What an nginx mutual-TLS proxy answers when a request comes without an accepted client certificate.
_PROXY_NO_CERT = b"No required SSL certificate was sent"
_PROXY_BAD_CERT = b"The SSL certificate error"
#: How long the probe listens after the handshake for a server's alert before it sends its request.
_ALERT_WAIT_S = 0.5
#: TLS alerts a server sends when it wants a client certificate it did not get or does not accept.
#: (Not "handshake failure": a cipher or protocol mismatch sends it too, and is reported as such.)
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REVOKED",
                       "CERTIFICATE_EXPIRED")


def tls_probe(address: str, root_certificates: Path, timeout_s: float = 10.0,
              client_certificate: Path | None = None, client_key: Path | None = None) -> CheckResult:
    """Open a TCP connection to ``host:port``, complete a TLS handshake verified with the given CA, then ask
    for ``/`` to learn whether a mutual-TLS proxy in front of the SuperLink accepts this site's certificate.

    Why the request: with TLS 1.3 the client's handshake completes before the server has judged the client
    certificate, and the consortium's nginx proxy reports a missing or refused certificate in its HTTP answer,
    not in the handshake; a site with a wrong, revoked or missing certificate would otherwise pass here and
    fail only when its SuperNode starts. Anything else the server answers (a Flower status, a closed
    connection, nothing within the timeout) counts as reached.

    Returns:
        A ``superlink`` :class:`CheckResult` saying which step failed (name resolution, connection, certificate
        verification, host name, client certificate) and what to do.
    """
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    name = "superlink"
    try:
        port = int(port_text)
        context = ssl.create_default_context(cafile=str(root_certificates))
    except ValueError:
        return CheckResult(name, False, f"connection: superlink {address!r} is not host:port", "e.g. fl.org:9091")
    except (OSError, ssl.SSLError) as exc:
        return CheckResult(name, False, f"root certificates {root_certificates} cannot be loaded: {exc}",
                           "copy the consortium CA certificate (ca.crt, PEM) from the coordinator")
    if client_certificate is not None and client_key is not None:
        try:
            context.load_cert_chain(str(client_certificate), str(client_key))
        except (OSError, ssl.SSLError) as exc:
            return CheckResult(name, False, f"trust: client-certificate {client_certificate} with client-key "
                               f"{client_key} cannot be loaded: {exc}",
                               "get them again from the coordinator (`lungmae certs --site NAME`)")
    answer = b""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                cert = tls.getpeercert() or {}
                version = tls.version()
                answer = _first_answer(tls, host, min(timeout_s, 5.0))
    except socket.gaierror as exc:
        return CheckResult(name, False, f"cannot resolve {host}: {exc.strerror}",
                           "check the coordinator's DNS name in connection: superlink and this host's DNS")
    except ssl.SSLCertVerificationError as exc:
        if "hostname" in str(exc.verify_message).lower() or "IP address mismatch" in str(exc):
            return CheckResult(name, False, f"the SuperLink's certificate does not name {host}: "
                               f"{exc.verify_message}", "use the name or IP the coordinator's certificate was "
                               "issued for, or ask the coordinator to reissue it with this name (lungmae certs "
                               "--renew-server)")
        return CheckResult(name, False, f"{address} answered but its certificate is not signed by the CA in "
                           f"{root_certificates}: {exc.verify_message}",
                           "get the current ca.crt from the coordinator (or you reached another service)")
    except ssl.SSLError as exc:
        if any(alert in str(exc).upper() for alert in _CLIENT_CERT_ALERTS):
            return _client_cert_refused(address, client_certificate, f"the TLS handshake ended with {exc}")
        return CheckResult(name, False, f"{address} accepted the connection but the TLS handshake failed: {exc}",
                           "the port may not be the SuperLink, or a proxy intercepts TLS; check connection: superlink")
    except ConnectionResetError as exc:
        return CheckResult(name, False, f"{address} accepted the connection but the TLS handshake failed: {exc}",
                           "the port may not be the SuperLink, or a proxy intercepts TLS; check connection: superlink")
    except TimeoutError:
        return CheckResult(name, False, f"no answer from {address} within {timeout_s:g} s",
                           f"a firewall probably blocks outgoing TCP to port {port}; ask IT to allow it")
    except ConnectionRefusedError:
        return CheckResult(name, False, f"{address} refused the connection",
                           "the SuperLink is not running there yet, or the port is wrong; ask the coordinator")
    except OSError as exc:
        return CheckResult(name, False, f"cannot connect to {address}: {exc.strerror or exc}",
                           "check the network route to the coordinator")
    if _PROXY_NO_CERT in answer or _PROXY_BAD_CERT in answer:
        said = (_PROXY_NO_CERT if _PROXY_NO_CERT in answer else _PROXY_BAD_CERT).decode()
        return _client_cert_refused(address, client_certificate, f"the proxy answered {said!r}")
    not_after = cert.get("notAfter")
    days = ""
    if isinstance(not_after, str) and not_after:
        expires = _dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), _dt.UTC)
        days = f", certificate valid for {(expires - _dt.datetime.now(_dt.UTC)).days} more days"
    presented = f"; client certificate {Path(client_certificate).name} presented" if client_certificate else ""
    return CheckResult(name, True, f"{address} reached over {version}, certificate verified with "
                       f"{root_certificates.name}{days}{presented}")


def _first_answer(tls: ssl.SSLSocket, host: str, timeout_s: float) -> bytes:
    """The first bytes the server sends after a plain ``GET /`` (empty if it closes or stays silent).

    First a short read with nothing sent: a server that refuses the client certificate in the handshake sends
    its alert now, and it would be lost if a request were already on its way when the server closes. TLS
    alerts (a refused client certificate) propagate as :class:`ssl.SSLError`; anything else that goes wrong
    here only means the server does not speak HTTP/1.1 (a gRPC SuperLink), which is fine.
    """
    try:
        tls.settimeout(min(timeout_s, _ALERT_WAIT_S))
        try:
            tls.recv(1)
        except TimeoutError:
            pass  # the server waits for a request: the certificate was accepted, or it is judged per request
        tls.settimeout(timeout_s)
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return tls.recv(4096)
    except ssl.SSLError as exc:
        if any(alert in str(exc).upper() for alert in _CLIENT_CERT_ALERTS):
            raise
        return b""
    except OSError:
        return b""


def _client_cert_refused(address: str, client_certificate: Path | None, what: str) -> CheckResult:
    if client_certificate is None:
        return CheckResult("superlink", False, f"{address} wants a TLS client certificate and none is set ({what})",
                           "set trust: client-certificate and client-key to this site's files from the "
                           "coordinator (`lungmae certs --site NAME` makes NAME.client.pem / NAME.client.key)")
    return CheckResult("superlink", False, f"{address} refused this site's client certificate {client_certificate} "
                       f"({what})", "it may be revoked, expired or made for another consortium: ask the coordinator "
                       "for a new one (`lungmae certs --site NAME`)")


def _check_superlink(cfg: Any, timeout_s: float) -> CheckResult:
    conn = cfg.connection
    if conn.root_certificates is None:
        return CheckResult("superlink", False, "connection: 'root-certificates' is not set, so the SuperLink "
                           "cannot be verified", "copy ca.crt from the coordinator and set connection: "
                           "root-certificates to it")
    if not Path(conn.root_certificates).is_file():
        return CheckResult("superlink", False, f"root certificates file {conn.root_certificates} does not exist",
                           "copy ca.crt from the coordinator there")
    trust = cfg.trust
    return tls_probe(conn.superlink, Path(conn.root_certificates), timeout_s,
                     client_certificate=trust.client_certificate, client_key=trust.client_key)


def _check_node_key(cfg: Any) -> CheckResult:
    from client.node_key import NodeKeyError, check_site_key

    key = cfg.connection.auth_key
    if key is None:
        return CheckResult("node-key", False, "connection: 'auth-key' is not set",
                           "make a key with `lungmae certs --out keys --site <name>`, set connection: auth-key to "
                           "the .key file and send the .pub file to the coordinator for registration")
    try:
        kind = check_site_key(key)
    except NodeKeyError as exc:
        return CheckResult("node-key", False, str(exc).split("; ")[0],
                           "; ".join(str(exc).split("; ")[1:]) or "make a new key with `lungmae certs`")
    pub = Path(str(key).removesuffix(".key") + ".pub")
    extra = f"; the coordinator registers {pub.name}" if pub.exists() else ""
    return CheckResult("node-key", True, f"{key} is an {kind} private key{extra}")


def _check_privacy(cfg: Any) -> CheckResult:
    dp = cfg.privacy
    if not dp.enabled:
        return CheckResult("privacy", None, "DP-SGD is off for this site (privacy: enabled false)")
    from client.ledger import LedgerError, PrivacyLedger

    ledger_path = Path(dp.ledger)  # load_site_config always sets it (default: <state-dir>/privacy-ledger.json)
    try:
        ledger = PrivacyLedger(ledger_path, budget_epsilon=float(dp.epsilon or 0.0), delta=dp.delta,
                               site=cfg.site.name)
        spent = ledger.epsilon_spent()
        rounds = len(ledger.entries())
    except LedgerError as exc:
        return CheckResult("privacy", False, str(exc), "restore the ledger from backup; never delete it to reset "
                           "the budget (your data protection officer signed the total)")
    left = float(dp.epsilon or 0.0) - spent
    state = "new ledger" if not ledger_path.exists() else f"{rounds} round(s) recorded"
    if left <= 0:
        return CheckResult("privacy", False, f"privacy budget spent: epsilon {spent:.3g} of {dp.epsilon:g} ({state})",
                           "this site can no longer train; it may still evaluate. A new budget needs your data "
                           "protection officer's approval")
    return CheckResult("privacy", True, f"ledger {ledger_path.name}: {state}, epsilon spent {spent:.3g} of "
                       f"{dp.epsilon:g}, {left:.3g} left")


def run_preflight(config: Path, *, min_free_gb: float = DEFAULT_MIN_FREE_GB, tls_timeout_s: float = 10.0,
                  on_result: Callable[[CheckResult], None] | None = None) -> PreflightReport:
    """Run every check on ``config`` (site.yaml) and collect the results.

    Args:
        config: path of site.yaml.
        min_free_gb: free disk the cache needs, in GB. Defaults to 5.
        tls_timeout_s: connection timeout of the SuperLink check, in seconds. Defaults to 10.
        on_result: called with each result as soon as it is known (to print progressively).

    Returns:
        The report; ``report.ok`` is False when any check failed.
    """
    report = PreflightReport()

    def add(result: CheckResult) -> None:
        report.results.append(result)
        if on_result is not None:
            on_result(result)

    result, cfg = _check_config(Path(config))
    add(result)
    if cfg is None:
        return report
    checks: list[tuple[str, Callable[[Any], CheckResult]]] = [
        ("input", _check_input), ("cache-disk", lambda c: _check_cache_disk(c, min_free_gb)),
        ("device", _check_device), ("cache", _check_cache), ("superlink", lambda c: _check_superlink(c, tls_timeout_s)),
        ("node-key", _check_node_key), ("privacy", _check_privacy)]
    for name, check in checks:
        try:
            add(check(cfg))
        except Exception as exc:  # a check must never hide the others
            add(CheckResult(name, False, f"the check itself failed: {type(exc).__name__}: {exc}",
                            "report this to the LungMAE-FL maintainers with the output above"))
    return report
