"""The layering rules: ``lungmae_core`` is framework-free and never imports Flower; ``client/`` and ``server/``
never import each other (the site's code and the coordinator's code meet only in ``lungmae_core``'s contract
and in ``lungmae_cli``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "lungmae_core"


def _imported_roots(path: Path) -> set[str]:
    """Top-level package names imported anywhere in a module (also inside functions)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_scanner_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from flwr.app import Message\n    import flwr.serverapp as s\n")
    assert _imported_roots(sample) == {"flwr"}


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_flower_client_or_server(path: Path) -> None:
    forbidden = _imported_roots(path) & {"flwr", "client", "server", "lungmae_cli", "ray"}
    assert not forbidden, f"{path.relative_to(CORE.parent)} imports {sorted(forbidden)}; lungmae_core must stay framework-free"


@pytest.mark.parametrize("path", sorted((ROOT / "client").rglob("*.py")), ids=lambda p: p.name)
def test_client_never_imports_server(path: Path) -> None:
    forbidden = _imported_roots(path) & {"server", "lungmae_cli"}
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}; a site runs without the server code"


@pytest.mark.parametrize("path", sorted((ROOT / "server").rglob("*.py")), ids=lambda p: p.name)
def test_server_never_imports_client(path: Path) -> None:
    forbidden = _imported_roots(path) & {"client", "lungmae_cli"}
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}; the coordinator runs without site code"
