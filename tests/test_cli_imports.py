"""The CLI package's import graph: no cycle, the subcommand modules import only ``workbench.cli.common``
among the CLI modules, and no library module imports the CLI. Read from the source with ``ast``
(every ``import`` and ``from ... import``, inside functions too), so nothing is imported to check it."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import workbench

PACKAGE = Path(workbench.__file__).parent
CLI = PACKAGE / "cli"
SHARED = {"workbench.cli", "workbench.cli.__main__", "workbench.cli.common"}  # the rest are subcommand modules


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """What ``path`` imports, as module names; ``from P import x`` counts as ``P.x`` when that is a module
    of the CLI package, else as ``P``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if (CLI / f"{alias.name}.py").exists() and source == "workbench.cli" else source)
    return found


def cli_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sorted(CLI.glob("*.py"))}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_cli_is_a_package_with_common_and_subcommand_modules():
    names = set(cli_graph())
    assert SHARED <= names and len(names - SHARED) >= 3, names
    assert not (PACKAGE / "cli.py").exists()
    assert not (PACKAGE / "bench" / "cli.py").exists() and not (PACKAGE / "ms" / "cli.py").exists()


def test_the_cli_modules_import_no_cycle():
    tuple(graphlib.TopologicalSorter(cli_graph()).static_order())  # raises CycleError naming the cycle


def test_subcommand_modules_import_only_common():
    graph = cli_graph()
    assert graph["workbench.cli.common"] == set()
    for name, imports in graph.items():
        if name not in SHARED:
            assert imports <= {"workbench.cli.common"}, (name, imports)


def test_no_library_module_imports_the_cli():
    for path in sorted(PACKAGE.rglob("*.py")):
        if CLI in path.parents or path == PACKAGE / "__main__.py":
            continue
        cli_imports = {m for m in imported_modules(path) if m == "workbench.cli" or m.startswith("workbench.cli.")}
        assert not cli_imports, (path, cli_imports)
