"""The serving lab (``workbench.labs.serving``): the run-cache fallback, decode timing against the model,
the hit-rate summary and takeaways, the offloading cost by hand, EPLB in the decode model, the results
files, and notebook 07's first cell and committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from tests.analysis.helpers import MICRO
from workbench.analysis import offload as off
from workbench.labs import serving as lab
from workbench.model import MoELM

ROOT = Path(__file__).resolve().parents[2]
STEM = "07_serving"


def _trace(seed=0, L=2, B=4, N=20, E=4, P=4):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([np.stack([rng.choice(E, size=2, replace=False) for _ in range(N)])
                              for _ in range(B)]) for _ in range(L)])
    return off.ExpertTrace(ids, E, P, {"gate_input": ids.copy()}, f"toy {seed}")


def test_hit_rate_summary_and_takeaways():
    traces = {0: _trace(0), 1: _trace(1)}
    frame = lab.hit_rate_frame(traces, [1, 2, 4], batches=(1, 2), prefetch=("gate_input",), say=lambda *_: None)
    assert set(frame["routing"]) == set(lab.ROUTINGS)
    summary = lab.hit_rate_summary(frame)
    # a cache of every expert misses each expert once; the random baseline has no prefetch rows
    assert (summary["seeds"] == 2).all()
    assert not len(summary[(summary["routing"] == lab.ROUTINGS[1]) & summary["policy"].str.contains("+", regex=False)])
    prefetch = lab.prefetch_frame(traces)
    assert (prefetch["recall"] == 1.0).all() and (prefetch["random_guess"] == 0.5).all()
    lines = lab.offload_takeaways(summary, prefetch, 4, batch=1)
    assert lines[0].endswith("True.") and any("prefetch" in line and "100.0%" in line for line in lines)
    # a token needs its top-2 experts: a step of one sequence needs exactly 2 per layer
    distinct = lab.distinct_table(summary, traces)
    assert distinct.loc[1, "generated"] == 2.0 and distinct.loc[1, "expected (uniform)"] == pytest.approx(2.0)
    assert distinct.loc[2, "expected (uniform)"] == pytest.approx(4 * (1 - (1 - 2 / 4) ** 2))


def test_offload_cost_by_hand():
    # one copy per step and layer on Mixtral (32 MoE layers, 3 x 4096 x 14336 bf16 weights per expert) over
    # H100's host link, added to the resident step
    from workbench.bench import perfmodel as pm
    from workbench.bench import serving

    summary = pd.DataFrame([{"routing": lab.ROUTINGS[0], "batch": 1, "policy": "lru", "capacity": 4, "hit_rate": 0.5,
                             "loads_per_step": 1.0, "demand_per_step": 1.0}])
    cost = lab.offload_cost(summary, devices=("H100",), policies=("lru",), prefetch_policy=None)
    copy_s = 32 * 3 * 4096 * 14336 * 2 / (off.host_link("H100") * 1e9)
    resident = serving.predict_decode(pm.shape("mixtral-8x7b"), pm.load_devices()["H100"], batch=1, context=1024)
    assert cost["copy_ms_per_step"].iloc[0] == pytest.approx(1e3 * copy_s)
    assert cost["tpot_ms"].iloc[0] == pytest.approx(1e3 * (copy_s + resident.tpot_s))


def test_eplb_decode_balanced_is_the_serving_models_step():
    from workbench.bench import serving

    row = lab.eplb_decode("deepseek-online-decode-h800", exponent=0.0)
    published = {r["key"]: r for r in serving.serving_errors()}["deepseek-online-decode-h800"]
    assert row["balanced_step_ms"] == pytest.approx(published["step_ms"])
    # uniform loads: 256 experts on 144 devices round-robin, 2 on 112 devices and 1 on 32: max / mean 2 x 144 / 256
    assert row["max_over_mean_before"] == pytest.approx(2 * 144 / 256)
    skewed = lab.eplb_decode("deepseek-online-decode-h800", exponent=0.5)
    assert skewed["max_over_mean_after"] < skewed["max_over_mean_before"]
    assert skewed["speedup"] > 1 and skewed["tokens_per_s_after"] <= skewed["tokens_per_s_balanced"] * 1.0001
    with pytest.raises(ValueError, match="figure"):
        lab.eplb_decode("deepseek-online-prefill-h800", exponent=0.5)


def test_eplb_trace_table_and_zipf():
    traces = {0: _trace(0, E=4)}
    table = lab.eplb_trace_table(traces, devices=(2,), redundant=(0, 2))
    assert (table["after"] <= table["before"] + 1e-12).all()
    assert len(lab.zipf_exponents(traces)) == 2


def test_time_decode_and_model_side_by_side():
    torch.manual_seed(0)
    model = MoELM(MICRO).eval()
    rows = lab.measure_decode(model, [1, 2], [16], steps=2, warmup=1, say=lambda *_: None)
    assert [r["batch"] for r in rows] == [1, 2] and all(r["step_ms"] > 0 for r in rows)
    peaks = {"matmul_peak_flops": 1e10, "copy_bandwidth_bytes_s": 1e10}
    frame = lab.decode_vs_model(rows, MICRO, peaks)
    assert set(frame["bound"]) <= {"memory", "compute"}
    assert np.allclose(frame["measured_over_predicted"], frame["tokens_per_s"] / frame["predicted_tokens_per_s"])


def test_fitting_ep_and_device_curves():
    from workbench.bench import perfmodel as pm

    shp, dev = pm.shape("deepseek-v3"), pm.load_devices()["H100"]
    ep = lab.fitting_ep(shp, dev, context=4096, precision="bf16")
    assert ep is not None and ep > 8  # 1.3 TB of bf16 weights need more than 8 x 80 GB
    rows = lab.device_curves(["qwen3-30b-a3b"], ["H100"], batches=(1, 8), ends=("value",))
    assert [r["batch"] for r in rows] == [1, 8] and rows[0]["tpot_ms"] <= rows[1]["tpot_ms"]


def test_trained_models_reuses_a_run_of_the_same_configs(tmp_path):
    import workbench
    from workbench.train import TrainConfig

    base = workbench.preset("tiny")
    train = TrainConfig(steps=3, batch_size=2, eval_windows=1, eval_every=3, progress=False)
    old = tmp_path / "06_generation" / "seed0-oldcode"
    old.mkdir(parents=True)
    info = {"format": "moe-workbench-run-1", "model_config": base.to_dict(),
            "train_config": {**train.to_dict(), "seed": 0}, "status": "finished", "updated": "2026-01-01"}
    (old / "run.json").write_text(json.dumps(info))
    calls = []
    import workbench.labs.generation as gen

    def fake_load(runs):
        calls.append(runs)
        return {s: None for s in runs}

    monkey = pytest.MonkeyPatch()
    monkey.setattr(gen, "load_models", fake_load)
    try:
        _, runs = lab.trained_models(base, train, [0], tmp_path, say=lambda *_: None)
    finally:
        monkey.undo()
    assert runs[0]["run_dir"] == str(old) and runs[0]["code"] == "earlier"


def test_hf_models_on_disk(tmp_path):
    (tmp_path / "m" / "snap").mkdir(parents=True)
    (tmp_path / "m" / "snap" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert lab.hf_models_on_disk([tmp_path]) == [tmp_path / "m" / "snap"]
    assert lab.hf_models_on_disk([tmp_path / "missing"]) == []


def test_results_round_trip(tmp_path):
    traces = {0: _trace(0), 3: _trace(3)}
    results = {"hit_rates": pd.DataFrame([{"a": 1}]), "peaks": {"matmul_peak_flops": 1.0}}
    lab.save_results(tmp_path, results, traces, root=ROOT, command="test", runtime_s=1.0, parameters={"x": 1})
    got, back = lab.load_results(tmp_path)
    assert got["hit_rates"] == [{"a": 1}] and got["meta"]["command"] == "test"
    assert sorted(back) == [0, 3]
    np.testing.assert_array_equal(back[3].expert_ids, traces[3].expert_ids)
    np.testing.assert_array_equal(back[3].prefetch["gate_input"], traces[3].prefetch["gate_input"])
    with pytest.raises(FileNotFoundError, match="traces.npz"):
        (tmp_path / "traces.npz").unlink()
        lab.load_results(tmp_path)


def _first_code_cell():
    nb = nbformat.read(ROOT / "notebooks" / f"{STEM}.ipynb", as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code"), nb


def test_first_code_cell_is_the_tagged_mode_parameter():
    cell, nb = _first_code_cell()
    assert "parameters" in cell.metadata.get("tags", [])
    assert "MODE = notebook_mode()" in cell.source and "SAVE_RESULTS = False" in cell.source
    assert "min measured" in cell.source  # the full mode's runtime, stated
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # outputs stripped


def test_committed_results_hold_what_the_notebook_draws():
    folder = ROOT / "notebooks" / "results" / STEM
    if not (folder / "results.json").is_file():
        pytest.skip("no committed results yet")
    committed, traces = lab.load_results(folder)
    for key in ("train", "peaks", "decode", "hit_rates", "prefetch", "eplb_traces", "zipf", "meta"):
        assert key in committed, key
    assert committed["meta"]["parameters"]["seeds"] == sorted(traces)
    summary = pd.DataFrame(committed["hit_rates"])
    assert set(summary["routing"]) == set(lab.ROUTINGS)
    assert not math.isnan(summary["hit_rate"].mean())
