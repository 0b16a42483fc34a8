"""The layering rules (docs/architecture.md): ``lungmae_core`` is framework-free and never imports Flower or
``lungmae_cli``; ``client/`` and ``server/`` never import each other (the site's code and the coordinator's code
meet only in ``lungmae_core``'s contract and in ``lungmae_cli``); no two ``lungmae_core`` modules import each
other, directly or round a longer loop. And modules stay small enough to hold in one's head: none outside tests/
over :data:`MAX_LINES` lines unless listed in :data:`LONG_MODULES` with a reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "lungmae_core"
PACKAGES = ("lungmae_core", "client", "server", "lungmae_cli", "benchmarks", "deploy")
MAX_LINES = 500
#: Modules allowed over MAX_LINES, each with the reason; remove an entry when its module is split.
LONG_MODULES: dict[str, str] = {
    "lungmae_core/train.py": "split planned: the MAE and classifier loops apart from the shared loop",
    "client/ledger.py": "split planned: the ledger file format apart from the reserve/settle protocol; 16 lines over",
}


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
    assert not forbidden, (f"{path.relative_to(CORE.parent)} imports {sorted(forbidden)}; "
                           "lungmae_core must stay framework-free")


@pytest.mark.parametrize("path", sorted((ROOT / "client").rglob("*.py")), ids=lambda p: p.name)
def test_client_never_imports_server(path: Path) -> None:
    forbidden = _imported_roots(path) & {"server", "lungmae_cli"}
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}; a site runs without the server code"


@pytest.mark.parametrize("path", sorted((ROOT / "server").rglob("*.py")), ids=lambda p: p.name)
def test_server_never_imports_client(path: Path) -> None:
    forbidden = _imported_roots(path) & {"client", "lungmae_cli"}
    assert not forbidden, (f"{path.relative_to(ROOT)} imports {sorted(forbidden)}; "
                           "the coordinator runs without site code")



def _module_name(path: Path, root: Path) -> str:
    """``lungmae_core/config/model.py`` -> ``lungmae_core.config.model``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Which modules of ``package`` each of its modules imports, read from the source (not by importing it).

    Every import counts: at the top, inside functions and under ``TYPE_CHECKING``, since a loop that only a
    lazy import keeps from failing is still two modules that cannot be understood apart. ``from pkg import
    name`` points at the submodule ``pkg.name`` when there is one, else at ``pkg`` itself. Importing a
    submodule also runs its parent package's ``__init__``; that implied edge is left out (a package that
    re-exports its submodules would otherwise always be a loop).
    """
    root = package.parent
    paths = {_module_name(p, root): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    targets.add(submodule if submodule in paths else module)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of ``graph``: each strongly connected set of two or more modules, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_cycle_finder_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import h\n")
    (pkg / "sub" / "c.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("from ..sub import c\n")
    (pkg / "e.py").write_text("import pkg.sub\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.e"] == {"pkg.sub"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]


def test_no_import_cycle_among_core_modules() -> None:
    cycles = import_cycles(import_graph(CORE))
    assert not cycles, (f"lungmae_core modules that import each other: {cycles}; move what both need into a "
                        "module of its own that both import (as PreprocessConfig lives in lungmae_core/config/)")


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_module_over_max_lines_without_a_reason() -> None:
    too_long = {str(p.relative_to(ROOT)): _lines(p) for p in _modules() if _lines(p) > MAX_LINES}
    unlisted = {k: v for k, v in too_long.items() if k not in LONG_MODULES}
    assert not unlisted, (f"modules over {MAX_LINES} lines: {unlisted}; split them by step or role, or list them in "
                          "tests/test_layering.py LONG_MODULES with the reason")


def test_long_module_exceptions_are_current() -> None:
    """An exception outlives its reason once the module is split or shrinks: the list must say what is true."""
    stale = [k for k in LONG_MODULES if not (ROOT / k).is_file() or _lines(ROOT / k) <= MAX_LINES]
    assert not stale, f"LONG_MODULES lists {stale}, which no longer exist or are within {MAX_LINES} lines; remove them"
    assert all(reason.strip() for reason in LONG_MODULES.values())


#: A file of the repository named in a doc, optionally with a name it defines: `server/runner.py: FederationRunner`.
_DOC_REFERENCE = re.compile(r"`((?:lungmae_core|client|server|lungmae_cli|tests|docs|deploy|benchmarks)/[\w./-]*)"
                            r"(?:: ([\w.]+))?`")


def _defines(path: Path, dotted: str) -> bool:
    """Whether ``path`` defines ``dotted`` at the top (a function, class or constant) or ``Class.member``."""
    scope: list[ast.stmt] = ast.parse(path.read_text(encoding="utf-8")).body
    for name in dotted.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                found = node
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                found = node
        if found is None:
            return False
        scope = found.body if isinstance(found, ast.ClassDef) else []
    return True


def test_scanner_reads_references_and_definitions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("class A:\n    x: int = 1\n    def f(self): ...\nB = 2\n")
    assert all(_defines(module, n) for n in ("A", "A.f", "A.x", "B"))
    assert not any(_defines(module, n) for n in ("C", "A.g", "B.x"))
    text = "`client/prepare.py: prepare_site`, `lungmae_core/dicom/` and `config/model.py`, `site.yaml`"
    assert _DOC_REFERENCE.findall(text) == [("client/prepare.py", "prepare_site"), ("lungmae_core/dicom/", "")]


def test_architecture_walk_names_files_and_definitions_that_exist() -> None:
    """docs/architecture.md walks a scan file by file: every path it names, and every name it says a file
    defines, must be there (a move or a rename that forgets the page fails here)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    references = _DOC_REFERENCE.findall(text)
    assert len(references) > 50, "the page should name the files of the walk"
    missing = sorted({path for path, _ in references if not (ROOT / path).exists()})
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    undefined = sorted({f"{path}: {name}" for path, name in references
                        if name and path.endswith(".py") and not _defines(ROOT / path, name)})
    assert not undefined, f"docs/architecture.md names definitions those files do not have: {undefined}"

