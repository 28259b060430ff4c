"""The first cells of a lab notebook, read as the notebook runs them: shared by the mode tests."""

from __future__ import annotations

from pathlib import Path

import nbformat

from workbench.labs import modes

ROOT = Path(__file__).resolve().parents[2]


def first_cells(stem: str):
    """(first markdown cell, first code cell) of ``notebooks/<stem>.ipynb``."""
    nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    markdown = next(c for c in nb.cells if c.cell_type == "markdown")
    code = next(c for c in nb.cells if c.cell_type == "code")
    return markdown, code


def parameters(stem: str, monkeypatch, **env: str) -> dict:
    """The namespace the notebook's first code cell leaves, run from notebooks/ with ``env`` only."""
    for name in (modes.ENV, modes.SMOKE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT / "notebooks")
    namespace: dict = {}
    exec(compile(first_cells(stem)[1].source, f"{stem}[parameters]", "exec"), namespace)  # noqa: S102
    return namespace
