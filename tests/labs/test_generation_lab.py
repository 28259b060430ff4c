"""The generation lab (``workbench.labs.generation``): how it judges the locality claim and the knobs,
its widget's HTML, its results file, and notebook 06's first cell and committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.analysis.helpers import MICRO
from tests.labs.notebook_cells import first_cells, parameters
from workbench.labs import generation as lab
from workbench.model import MoELM

ROOT = Path(__file__).resolve().parents[2]
STEM = "06_generation"


def _frame(excess_by_layer: dict[int, list[float]], chance: float = 0.2, condition: str = "validation"):
    """A locality frame with one top1 row per (seed, layer): rate = chance + the given excess."""
    rows = []
    for layer, excesses in excess_by_layer.items():
        for seed, excess in enumerate(excesses):
            rows.append({"seed": seed, "condition": condition, "layer": layer, "metric": "top1",
                         "rate": chance + excess, "chance": chance, "shuffled": chance,
                         "ratio": (chance + excess) / chance})
    return pd.DataFrame(rows)


def test_min_layers_is_all_but_one():
    assert [lab.min_layers(n) for n in (1, 2, 4, 6)] == [1, 1, 3, 5]


def test_locality_claim_above_chance_and_deeper():
    # clear excess growing with depth in every layer, small seed noise
    frame = _frame({0: [0.01, 0.012, 0.011], 1: [0.03, 0.031, 0.029], 2: [0.05, 0.052, 0.05], 3: [0.08, 0.079, 0.081]})
    c = lab.locality_claim(frame, "validation")
    assert c["held"] == 4 and c["needed"] == 3 and c["above_chance"] is True and c["deeper_more_local"] is True
    assert c["layers"][0]["ratio"] == pytest.approx((0.2 + 0.011) / 0.2)
    assert "REPRODUCED" in c["verdict"] and "NOT REPRODUCED" not in c["verdict"]


def test_locality_claim_fails_within_noise_and_flat_depth():
    # two layers clearly above, two within noise: 2 of the 3 needed; the same excess at every depth
    frame = _frame({0: [0.05, 0.05, 0.05], 1: [0.05, 0.051, 0.049], 2: [0.05, -0.05, 0.01], 3: [-0.03, 0.06, 0.0]})
    c = lab.locality_claim(frame, "validation")
    assert c["held"] == 2 and c["above_chance"] is False
    assert c["deeper_more_local"] is False
    assert c["verdict"].count("NOT REPRODUCED") == 2


def test_locality_claim_with_one_seed_cannot_judge():
    c = lab.locality_claim(_frame({0: [0.1], 1: [0.1]}), "validation")
    assert c["above_chance"] is None and c["deeper_more_local"] is None and "cannot be judged" in c["verdict"]


def test_locality_claim_against_the_permutation_baseline():
    frame = _frame({0: [0.05, 0.05, 0.051], 1: [0.05, 0.049, 0.05]})
    frame["shuffled"] = frame["rate"]  # all of the excess is the sequences' own load
    c = lab.locality_claim(frame, "validation", baseline="shuffled")
    assert c["held"] == 0 and c["above_chance"] is False and c["layers"][0]["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="condition"):
        lab.locality_claim(frame, "generated")


def test_knob_summary_pairs_over_seeds_and_judges_quality():
    rows = []
    for seed, base_loss in enumerate((2.00, 2.10, 1.90)):
        rows += [{"seed": seed, "setting": "trained", "val_loss": base_loss, "arithmetic": 0.5},
                 {"seed": seed, "setting": "cheap", "val_loss": base_loss + 0.005, "arithmetic": 0.49},
                 {"seed": seed, "setting": "costly", "val_loss": base_loss + 0.1, "arithmetic": 0.5},
                 {"seed": seed, "setting": "capacity 1", "val_loss": base_loss + 0.001, "arithmetic": math.nan}]
    frame = pd.DataFrame(rows).assign(experts_per_token=2.0, dropped_fraction=0.0, **{"bpb/code": 3.0})
    s = lab.knob_summary(frame)
    assert s.loc["cheap", "d_val_loss"] == pytest.approx(0.005) and s.loc["cheap", "d_val_loss_se"] == pytest.approx(0)
    assert s.loc["cheap", "d_arithmetic"] == pytest.approx(-0.01)
    assert s.loc["cheap", "keeps_quality"] and not s.loc["costly", "keeps_quality"]
    assert s.loc["capacity 1", "keeps_quality"] and math.isnan(s.loc["capacity 1", "arithmetic"])
    lines = lab.knob_takeaways(s)
    assert len(lines) == 3 and "costs quality" in lines[1] and "not measured" in lines[2]


def test_display_samples_html_and_agreement():
    torch.manual_seed(0)
    model = MoELM(MICRO).eval()
    samples = lab.display_samples(model, {"code": "def f(", "prose": "The "}, new_tokens=6, temperature=0.0)
    assert [s["domain"] for s in samples] == ["code", "prose"]
    s = samples[0]
    assert len(s["tokens"]) == len("def f(") + 6 and s["prompt_len"] == len("def f(")
    layer = s["layers"][0]
    assert len(layer["experts"]) == len(s["tokens"]) and all(len(e) == MICRO.moe.top_k for e in layer["experts"])
    assert all(g[0] >= g[1] for g in layer["gates"])  # first choice first
    html = lab.routing_html(s, 0)
    assert html.count("<span") >= len(s["tokens"]) and "text-decoration:underline" in html
    assert lab.routing_html(s, 1, forced=True) != ""
    agreement = pd.DataFrame(lab.sample_agreement(samples))
    assert len(agreement) == 2 * len(MICRO.moe_layers) and (agreement["set"] == 1.0).all()


def test_save_and_load_results(tmp_path):
    frame = pd.DataFrame([{"seed": 0, "x": 1.5}])
    path = lab.save_results(tmp_path, {"locality": frame, "speed": {"rows": [torch.tensor([1, 2])]}}, root=ROOT,
                            command="pytest", runtime_s=12.34, parameters={"seeds": [0, 1]})
    loaded = lab.load_results(tmp_path)
    assert path.name == "results.json" and loaded["locality"] == [{"seed": 0, "x": 1.5}]
    assert loaded["speed"] == {"rows": [[1, 2]]}
    meta = loaded["meta"]
    assert {"date", "machine", "commit", "command", "runtime_s", "parameters"} <= set(meta)
    assert meta["runtime_s"] == 12.3 and meta["command"] == "pytest" and meta["parameters"]["seeds"] == [0, 1]
    with pytest.raises(FileNotFoundError, match="results.json"):
        lab.load_results(tmp_path / "missing")


# --- notebook 06: its first cell, and the committed results its results mode reads ------------------


def test_full_mode_runs_three_seeds_or_more(monkeypatch):
    """What is particular to notebook 06's first cell (the shared checks: tests/labs/test_notebook_modes.py)."""
    assert "min measured" in first_cells(STEM)[1].source  # the full mode's measured runtime is stated
    assert len(parameters(STEM, monkeypatch)["SEEDS"]) >= 3
    assert parameters(STEM, monkeypatch, WORKBENCH_SMOKE="1")["SMOKE"] is True


def test_committed_results_hold_what_the_notebook_draws():
    folder = ROOT / "notebooks" / "results" / STEM
    if not (folder / "results.json").is_file():
        pytest.skip("the full-mode results are not committed yet")
    r = lab.load_results(folder)
    assert {"date", "machine", "commit", "command", "runtime_s"} <= set(r["meta"])
    assert len(r["meta"]["parameters"]["seeds"]) >= 3
    frame = pd.DataFrame(r["locality"])
    assert set(frame["condition"]) == set(lab.CONDITIONS) and set(frame["metric"]) == {"top1", "topk"}
    for condition in lab.CLAIM_CONDITIONS:
        claim = lab.locality_claim(frame, condition)
        assert claim["above_chance"] is not None and claim["verdict"]
    summary = lab.knob_summary(pd.DataFrame(r["knobs"]))
    assert "trained" in summary.index and len(summary) > 1
    assert {s["domain"] for s in r["samples"]} == set(lab.DISPLAY_PROMPTS)
    assert r["determinism"]["same_seed_same_text"] and r["determinism"]["cache_equals_recompute"]
    assert len(lab.speed_table(r["speed"])) >= 3 and r["speed"]["distinct_experts"]
    json.dumps(r)  # plain data throughout
