"""Supply chain: what each install extra pulls in, the lock files, and that every declared dependency is used.

The dependency closure of ``lungmae-fl[site]`` is computed from the installed distributions' metadata (the
requirements and markers pip resolves from), so adding ``flwr[simulation]`` (Ray) to a site extra, directly or
through another package, fails here. The lock files under requirements/ are read as pip reads them.
"""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SOURCE_PACKAGES = ("lungmae_core", "client", "server", "lungmae_cli")
# Declared but loaded by another package rather than imported by ours: pydicom finds its pixel-data plugins
# (JPEG, JPEG 2000, RLE decoders) by name at run time.
LOADED_BY_PLUGIN = {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"}
# A version cap, not a library we call (it keeps an incompatible release out of the resolution).
CONSTRAINTS_ONLY = {"packaging"}


def _closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Canonical names of ``name`` and everything it requires with ``extras``, per installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(canonicalize_name(name), extras)]
    while todo:
        dist_name, dist_extras = todo.pop()
        if (dist_name, dist_extras) in seen:
            continue
        seen.add((dist_name, dist_extras))
        names.add(dist_name)
        try:
            requires = metadata.distribution(dist_name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a CUDA wheel's dependency); its own deps cannot be walked
        for line in requires:
            req = Requirement(line)
            wanted = [""] + sorted(dist_extras)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return names


def _lock(name: str) -> dict[str, Version]:
    """``{package: version}`` pinned in requirements/<name>.txt."""
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def test_site_install_pulls_no_ray_but_simulation_does() -> None:
    site = _closure("lungmae-fl", frozenset({"site"}))
    assert "flwr" in site and "dicomweb-client" in site and "opacus" in site
    assert "ray" not in site, "lungmae-fl[site] must not pull Ray (it is Flower's simulation backend)"
    assert "ray" not in _closure("lungmae-fl", frozenset({"server"}))
    assert "ray" in _closure("lungmae-fl", frozenset({"sim"}))  # the check above can fail


@pytest.mark.parametrize("lock, extras, ray", [("site.txt", {"site"}, False), ("deploy.txt", {"site", "server"}, False),
                                               ("dev.txt", {"sim", "dev"}, True)])
def test_lock_files_pin_every_dependency_with_hashes_and_satisfy_pyproject(lock: str, extras: set[str],
                                                                         ray: bool) -> None:
    pins = _lock(lock)
    text = (REPO / "requirements" / lock).read_text()
    assert text.count("--hash=sha256:") >= len(pins)  # pip then refuses any file whose hash differs
    assert ("ray" in pins) == ray
    assert "torch" not in pins  # installed first, per hardware (requirements/torch-constraint.txt)
    declared = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        declared += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    for req in declared:
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{lock} does not pin {name}; run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock} pins {name}=={pins[name]}, not {req}"
    installed = _closure("lungmae-fl", frozenset(extras)) - {"lungmae-fl", "torch"}
    # everything the installed metadata says the extras need is pinned (torch's own deps included)
    missing = sorted(n for n in installed if n not in pins and not n.startswith("nvidia-") and n != "triton")
    assert not missing, f"{lock} lacks {missing}; run `make lock`"


def _imported_modules() -> set[str]:
    names: set[str] = set()
    for package in SOURCE_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def test_every_declared_runtime_dependency_is_imported() -> None:
    imported = _imported_modules()
    by_dist: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(canonicalize_name(dist), set()).add(module)
    runtime = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["site"] + \
        PYPROJECT["optional-dependencies"]["server"]
    unused = []
    for line in runtime:
        name = canonicalize_name(Requirement(line).name)
        if name in LOADED_BY_PLUGIN | CONSTRAINTS_ONLY:
            continue
        if not by_dist.get(name, set()) & imported:
            unused.append(name)
    assert not unused, f"declared in pyproject.toml but never imported by {SOURCE_PACKAGES}: {unused}"


def test_pydicom_finds_the_declared_decoder_plugins() -> None:
    """The pylibjpeg entries are 'used' through pydicom: its decoders must report them available."""
    from pydicom.pixels.decoders import JPEG2000Decoder, JPEGBaseline8BitDecoder, RLELosslessDecoder

    assert JPEGBaseline8BitDecoder.is_available and JPEG2000Decoder.is_available
    assert "pylibjpeg" in RLELosslessDecoder.available_plugins
