"""The long notebooks (02, 03, 06, 07, 08) open on their committed results: the first code cell is tagged
``parameters``, takes its mode from one environment variable (``WORKBENCH_MODE``; ``WORKBENCH_SMOKE=1``
still means smoke), defaults to results, and the committed files that results mode reads exist and load.
A missing results file fails here, not in the notebook."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from tests.labs.notebook_cells import first_cells, parameters
from workbench.labs import balancing, generation, lifecycle, modes, serving, specialization

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = {"02_load_balancing": balancing, "03_expert_specialization": specialization,
             "06_generation": generation, "07_serving": serving, "08_upcycling_and_finetuning": lifecycle}


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_first_code_cell_is_the_tagged_mode_parameter(stem):
    markdown, code = first_cells(stem)
    assert "parameters" in code.metadata.get("tags", []), f"{stem}: first code cell lacks the parameters tag"
    assert code.source.count("notebook_mode()") == 1  # the one place the environment is read for the mode
    assert 'environ.get("WORKBENCH' not in code.source  # the mode's variables are read by notebook_mode only
    for word in ("results", "smoke", "full", "WORKBENCH_MODE", "WORKBENCH_SMOKE=1", "SAVE_RESULTS"):
        assert word in markdown.source, f"{stem}: the first markdown cell does not mention {word}"


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_mode_defaults_to_results_and_follows_the_environment(stem, monkeypatch):
    p = parameters(stem, monkeypatch)
    assert p["MODE"] == "results" and p["SAVE_RESULTS"] is False and p["SMOKE"] is False
    assert p["RESULTS_DIR"] == ROOT / "notebooks" / "results" / stem
    assert p["OUT_DIR"].is_relative_to(ROOT / "runs")  # smoke and full write under runs/, never the results
    assert parameters(stem, monkeypatch, WORKBENCH_SMOKE="1")["MODE"] == "smoke"
    assert parameters(stem, monkeypatch, WORKBENCH_SMOKE="1")["SMOKE"] is True
    assert parameters(stem, monkeypatch, WORKBENCH_MODE="full")["MODE"] == "full"
    assert parameters(stem, monkeypatch, WORKBENCH_MODE="results")["MODE"] == "results"


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_results_mode_has_the_committed_files_it_reads(stem, monkeypatch):
    lab = NOTEBOOKS[stem]
    folder = parameters(stem, monkeypatch)["RESULTS_DIR"]
    for name in lab.RESULTS_FILES:
        assert (folder / name).is_file(), f"{stem}: committed results file {folder / name} is missing"
    loaded = lab.load_results(folder)
    if lab is serving:  # the results JSON and the routing traces of one model per seed
        results, traces = loaded
        assert len(results["train"]) >= 3 and set(traces) == {r["seed"] for r in results["train"]}
        return
    if lab is lifecycle:  # one JSON of tables: every run of every seed, with its FLOPs
        runs = loaded["runs"]
        assert runs["seed"].nunique() >= 3 and (runs["flops"] > 0).all()
        return
    if lab is generation:  # one JSON of tables: one row per seed's trained model
        runs = loaded["train"]
        assert len(runs) >= 3 and all(r["val_loss"] == r["val_loss"] for r in runs)  # 3+ seeds, no NaN
        return
    runs = loaded.runs if lab is balancing else loaded.results.runs
    assert len(runs) > 0 and not runs["val_loss"].isna().any()


def test_committed_balancing_results_hold_what_the_notebook_draws():
    results = balancing.load_results(ROOT / "notebooks" / "results" / "02_load_balancing")
    assert set(results.runs["group"]) == {"methods", "accumulation", "capacity"}
    assert len(results.details) == len(results.runs)
    detail = results.detail("loss-free 1e-3", 0)
    assert detail["load_fraction"] and detail["bias"] and detail["evals"][-1]["routing_matrix"]
    assert balancing.claim_check(results.runs[results.runs["group"] == "methods"])["verdict"]


def test_committed_specialization_results_hold_what_the_notebook_draws():
    c = specialization.load_results(ROOT / "notebooks" / "results" / "03_expert_specialization")
    runs = set(zip(c.results.runs["name"], c.results.runs["seed"], strict=True))
    assert set(zip(c.frame["name"], c.frame["seed"], strict=True)) == runs
    assert set(zip(c.saturation["name"], c.saturation["seed"], strict=True)) == runs
    assert {"layer", "domain_nmi", "vocab"} <= set(c.untrained.columns)
    scores = specialization.run_scores(c.frame)
    names = list(dict.fromkeys(c.results.runs["name"]))
    assert specialization.claim_check(scores, names[2], names[0], "DeepSeekMoE")["verdict"]


@pytest.mark.parametrize("lab", [balancing, specialization])
def test_load_results_names_the_missing_files(lab, tmp_path):
    (tmp_path / lab.RESULTS_FILES[0]).write_text("name,seed\n")
    with pytest.raises(FileNotFoundError) as err:
        lab.load_results(tmp_path)
    for name in lab.RESULTS_FILES[1:]:
        assert name in str(err.value)
    assert lab.RESULTS_FILES[0] not in str(err.value).split("lacks")[1].split(":")[0]


def test_notebook_mode():
    assert modes.notebook_mode({}) == "results"
    assert modes.notebook_mode({"WORKBENCH_SMOKE": "0"}) == "results"
    assert modes.notebook_mode({"WORKBENCH_SMOKE": "1"}) == "smoke"
    assert modes.notebook_mode({"WORKBENCH_MODE": "Full "}) == "full"
    assert modes.notebook_mode({"WORKBENCH_MODE": "", "WORKBENCH_SMOKE": "1"}) == "smoke"
    assert modes.notebook_mode({"WORKBENCH_MODE": "smoke", "WORKBENCH_SMOKE": "1"}) == "smoke"
    with pytest.raises(ValueError, match="WORKBENCH_SMOKE=1 asks for smoke mode but WORKBENCH_MODE=full"):
        modes.notebook_mode({"WORKBENCH_MODE": "full", "WORKBENCH_SMOKE": "1"})
    with pytest.raises(ValueError, match="choose one of results, smoke, full"):
        modes.notebook_mode({"WORKBENCH_MODE": "fast"})
    with pytest.raises(ValueError, match="MODE='fast'"):
        modes.check_mode("fast")
    assert modes.notebook_mode() == modes.notebook_mode(dict(os.environ))


def test_notebook_02_runs_in_results_mode(tmp_path, monkeypatch):
    """Run All with nothing set reads the committed results (about 15 s): no error, nothing trained,
    the committed results untouched."""
    nbclient = pytest.importorskip("nbclient")
    for name in (modes.ENV, modes.SMOKE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    folder = ROOT / "notebooks" / "results" / "02_load_balancing"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    nb = nbformat.read(ROOT / "notebooks" / "02_load_balancing.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "mode: results" in text and "trained now" not in text
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
