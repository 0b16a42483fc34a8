"""The systemd units in deploy/systemd: parsed, sandboxed and limited, and accepted by `systemd-analyze verify`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "systemd").glob("*.service"))
REQUIRED = {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict", "ProtectHome": "yes"}


def _service(path: Path) -> dict[str, list[str]]:
    """The [Service] section; systemd allows repeated keys (Environment=), so values are lists."""
    values: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        assert "=" in line, f"{path.name}: not a key=value line: {line!r}"
        key, value = line.split("=", 1)
        if section == "Service":
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_units_exist() -> None:
    assert {u.name for u in UNITS} >= {"lungmae-server.service", "lungmae-federation.service",
                                        "lungmae-site.service", "lungmae-proxy.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_sandboxed_and_limited(unit: Path) -> None:
    service = _service(unit)
    for key, value in REQUIRED.items():
        assert service.get(key) == [value], f"{unit.name}: {key}={value} expected, got {service.get(key)}"
    assert service.get("User") == ["lungmae"] and service.get("Group") == ["lungmae"], unit.name
    memory = service.get("MemoryMax", [""])[0]
    assert re.fullmatch(r"\d+[KMGT]", memory), f"{unit.name}: MemoryMax={memory!r}"
    cpu = service.get("CPUQuota", [""])[0]
    assert re.fullmatch(r"\d+%", cpu) and int(cpu[:-1]) >= 100, f"{unit.name}: CPUQuota={cpu!r}"
    writable = " ".join(service.get("ReadWritePaths", []))
    assert writable.startswith("/var/lib/lungmae"), f"{unit.name}: writes outside /var/lib/lungmae: {writable}"
    assert not any("0.0.0.0" in cmd for cmd in service.get("ExecStart", [])), "the SuperLink must not bind all"


def test_site_unit_keeps_gpu_devices_and_server_units_do_not() -> None:
    by_name = {u.name: _service(u) for u in UNITS}
    assert by_name["lungmae-site.service"]["PrivateDevices"] == ["no"]  # /dev/nvidia* for training
    for name in ("lungmae-server.service", "lungmae-federation.service", "lungmae-proxy.service"):
        assert by_name[name]["PrivateDevices"] == ["yes"], name
    assert "--signing-key" in by_name["lungmae-federation.service"]["ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_units(tmp_path: Path) -> None:
    # verify checks that ExecStart programs exist: point them at this environment's lungmae
    lungmae = Path(sys.executable).parent / "lungmae"
    if not lungmae.exists():
        pytest.skip(f"{lungmae} is not installed (pip install -e .)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for unit in UNITS:
        text = unit.read_text().replace("/opt/lungmae/venv/bin/lungmae", str(lungmae)).replace("/usr/sbin/nginx",
                                                                                            nginx)
        (tmp_path / unit.name).write_text(text)
    if not Path(nginx).exists():
        (tmp_path / "lungmae-proxy.service").unlink()
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(map(str, tmp_path.glob("*.service")))],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "Unknown key" in line or "Invalid" in line or "not executable" in line or "Failed" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
