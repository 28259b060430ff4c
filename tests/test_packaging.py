"""The setup files stay in step: pyproject extras, environment.yml, Makefile, README, CI."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_and_all_covers_every_other_extra():
    extras = pyproject()["project"]["optional-dependencies"]
    assert {"notebooks", "tracking", "mindspore", "dev", "all"} <= set(extras)
    (all_spec,) = extras["all"]
    listed = set(re.search(r"\[(.*)\]", all_spec).group(1).split(","))
    assert listed == set(extras) - {"all"}


def test_environment_yml_installs_the_project_with_every_extra_and_the_makefile_torch():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-e .[all]" in pip
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert torch_spec in pip


def test_python_requirement_admits_the_running_python_and_matches_the_linter_target():
    """requires-python, ruff's target version and the interpreter that runs the tests agree: a
    lower floor than ruff's target would let ruff accept syntax the oldest allowed Python lacks."""
    from packaging.specifiers import SpecifierSet

    project = pyproject()
    spec = SpecifierSet(project["project"]["requires-python"])
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in spec
    target = project["tool"]["ruff"]["target-version"]  # e.g. "py310"
    floor = f"{target[2]}.{target[3:]}"
    assert floor in spec
    assert f"{target[2]}.{int(target[3:]) - 1}" not in spec


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(make \w+)", readme.split("```bash", 1)[1].split("```", 1)[0], re.M)
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
