"""deploy/Dockerfile is built and run: in the image, `lungmae server start --proxy-listen` (SuperLink on loopback
behind the image's nginx, mutual TLS), `lungmae site preflight` through the proxy, and a 2-site federation of
`lungmae site start` sites submitted signed by `lungmae server run` (tests/deploy/container_federation.sh).

The image is built by deploy/image/build.sh (what `make image` runs) from a base made of Debian's packages
(deploy/image/debian-base.sh: mmdebstrap -> tarball -> `podman import`), since no container registry is
reachable here, with every Python dependency from the lock file's wheelhouse and no network during the build.
Cost bound: the base tarball is cached (~/.cache/lungmae-image); the application image carries a hash of its
inputs and is rebuilt only when one changes (`--if-missing`); .ci/run builds both before the timed suite, so
there the test costs only the container run (measured: 242 s on a heavily loaded 2-core machine; a rebuild of
the code layers alone, 81 s). Skipped, saying why, only where no container engine can run a
container.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/lungmae:test"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _engine_env() -> tuple[str, dict[str, str]]:
    """The engine (podman, else a docker whose daemon answers) and its environment; skips when none works."""
    env = dict(os.environ)
    if shutil.which("podman"):
        if "CONTAINERS_CONF" not in env and not Path("/sys/fs/cgroup/cgroup.controllers").exists() \
                and shutil.which("runc"):
            env["CONTAINERS_CONF"] = str(REPO / "deploy" / "image" / "containers.conf")  # hybrid cgroups: runc
        probe = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return "podman", env
        pytest.skip(f"podman is installed but cannot work here: {probe.stderr.strip()[-300:]}")
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        return "docker", env
    pytest.skip("no container engine: install podman (Debian packages podman, runc) or start a docker daemon")


@pytest.fixture(scope="module")
def image() -> tuple[str, dict[str, str]]:
    engine, env = _engine_env()
    if engine == "podman" and not shutil.which("mmdebstrap") and subprocess.run(
            ["podman", "image", "exists", "localhost/lungmae-base:bookworm"], env=env).returncode != 0:
        pytest.skip("no base image and no mmdebstrap to make one (Debian package mmdebstrap)")
    env.update(ENGINE=engine, IMAGE=IMAGE, BASE_IMAGE="debian-local")
    t0 = time.monotonic()
    build = subprocess.run([str(REPO / "deploy" / "image" / "build.sh"), "--if-missing"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1400)
    assert build.returncode == 0, build.stderr[-6000:]
    print(f"image ready in {time.monotonic() - t0:.0f} s ({build.stderr.strip().splitlines()[-1][:200]})")
    return engine, env


def test_image_runs_preflight_and_a_two_site_federation(image: tuple[str, dict[str, str]]) -> None:
    engine, env = image
    script = REPO / "tests" / "deploy" / "container_federation.sh"
    t0 = time.monotonic()
    res = subprocess.run([engine, "run", "--rm", "--network=none", "--entrypoint", "/bin/sh",
                          "-v", f"{script}:/opt/check.sh:ro", "-e", "LUNGMAE_CLIENT_THREADS=1", IMAGE, "/opt/check.sh"],
                         env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    print(f"container run: {time.monotonic() - t0:.0f} s")
    assert res.returncode == 0, out[-6000:]
    assert "== preflight" in out and "PREFLIGHT FAILED" not in out
    assert "== run status finished:completed" in out
    assert "(1, 'pretrain', ['site0', 'site1'])" in out and "(2, 'finetune', ['site0', 'site1'])" in out
    assert "client certificate site0.client.pem presented" in out  # preflight went through the proxy
    requests = int(out.split("== proxy requests ")[1].split()[0])
    assert requests > 10, out[-3000:]  # the sites' Fleet traffic went through nginx


def test_image_has_no_ray_runs_as_its_own_user_and_refuses_nothing_it_needs(image: tuple[str, dict[str, str]]) -> None:
    engine, env = image
    res = subprocess.run([engine, "run", "--rm", "--network=none", "--entrypoint", "/bin/sh", IMAGE, "-c",
                          "id -un; python3 -c 'import importlib.util as u; print(u.find_spec(\"ray\") is None)'; "
                          "python3 -c 'import torch, monai, dicomweb_client, opacus; print(torch.__version__)'; "
                          "lungmae site pull --help | head -n 1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    user, no_ray, torch_version, pull_help = res.stdout.strip().splitlines()[:4]
    assert user == "lungmae" and no_ray == "True"
    assert torch_version.startswith("2.13.0")
    assert pull_help.startswith("usage: lungmae site pull")
