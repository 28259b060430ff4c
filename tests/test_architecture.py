"""The package's layering holds: the readable MoE (``workbench.moe``) is pure PyTorch and imports
none of the fast paths beside it; they import it. Read from the source (``ast``), so a new import
anywhere is checked; ``if TYPE_CHECKING:`` imports are left out, since they never run."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

from workbench.config import preset
from workbench.moe import MoELayer
from workbench.moe.metrics import routing_metrics

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The workbench modules ``path`` imports when it runs (``from pkg import sub`` counts as ``pkg.sub``
    where ``sub`` is a module, else as ``pkg``)."""
    tree = ast.parse(path.read_text())
    type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                     for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                where = PACKAGE.parent / Path(*sub.split("."))
                found.add(sub if where.with_suffix(".py").exists() or where.is_dir() else node.module)
    return {name for name in found if name.split(".")[0] == "workbench"}


def graph(subpackage: str) -> dict[str, set[str]]:
    folder = PACKAGE / subpackage.replace(".", "/")
    return {module_name(p): runtime_imports(p) for p in sorted(folder.rglob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the keys of ``edges`` (as a list of modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in edges:
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_readable_moe_imports_no_kernel_no_parallelism_and_no_model():
    for module, imports in graph("moe").items():
        outside = {name for name in imports if not name.startswith("workbench.moe")}
        assert outside <= {"workbench.validation"}, f"{module} imports {sorted(outside)}"


def test_the_moe_modules_import_no_cycle():
    # the package's __init__ imports its modules to re-export them; the modules themselves form a DAG
    edges = {m: {i for i in imports if i != "workbench.moe"} for m, imports in graph("moe").items()
             if m != "workbench.moe"}
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_the_kernels_import_the_moe_and_never_the_reverse():
    kernels = graph("kernels")
    assert any(i.startswith("workbench.moe") for imports in kernels.values() for i in imports)
    assert find_cycle({**kernels, **graph("moe")}) is None


def test_the_readable_layer_runs_no_kernel_code():
    """One forward of the pure layer, and its metrics, trace through workbench.moe alone: no
    kernel predicate, no kernel op (the fused subclasses are applied from outside, by convert)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    layer = MoELayer(cfg.d_model, cfg.moe).train()
    x = torch.randn(2, 16, cfg.d_model)
    files: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and f"{PACKAGE}" in frame.f_code.co_filename:
            files.add(str(Path(frame.f_code.co_filename).relative_to(PACKAGE)))

    sys.setprofile(profile)
    try:
        _, info = layer(x)
        routing_metrics(info)
    finally:
        sys.setprofile(None)
    assert files and all(f.startswith("moe/") for f in files), sorted(files)
