"""The throughput harness's units: timing, summaries, sweeps, backends, the MindSpore contract, JSON, CLI.

No timing is asserted: only that the figures follow from the times the harness recorded.
"""

from __future__ import annotations

import json
import statistics
import sys
import types
from pathlib import Path

import pytest
import torch

from workbench.bench import harness
from workbench.bench import perfmodel as pm
from workbench.cli import main

TINY = harness.LayerCase(tokens=64, d_model=32, num_experts=4, top_k=2, expert_hidden=32)


def test_time_steps_times_only_the_repeats_and_syncs_around_each():
    ticks = iter(range(100))
    calls, syncs = [], []
    times = harness.time_steps(lambda: calls.append(1), repeats=3, warmup=2, sync=lambda: syncs.append(1),
                               clock=lambda: float(next(ticks)))
    assert len(calls) == 5 and len(syncs) == 6
    assert times == [1.0, 1.0, 1.0]  # each timed step read the clock twice, one tick apart
    with pytest.raises(ValueError, match="repeats"):
        harness.time_steps(lambda: None, repeats=0, warmup=0)


def test_summarize_follows_from_the_median():
    s = harness.summarize([1.0, 3.0, 2.0], tokens=100, flops_per_step=4e12, matmul_peak_flops=4e12,
                          datasheet_peak_flops=8e12)
    assert s["step_s_median"] == 2.0 and s["tokens_per_s"] == 50.0
    assert s["tflops"] == pytest.approx(2.0)
    assert s["mfu_measured_peak"] == pytest.approx(0.5) and s["mfu_datasheet"] == pytest.approx(0.25)
    assert harness.summarize([1.0], tokens=1, flops_per_step=1, matmul_peak_flops=None)["mfu_measured_peak"] is None


def test_granularity_sweep_keeps_the_expert_flops():
    cases = harness.sweep_cases("granularity", harness.LayerCase(), (1, 2, 4))
    assert [c.num_experts for c in cases] == [16, 32, 64] and [c.top_k for c in cases] == [2, 4, 8]
    assert len({c.top_k * c.expert_hidden for c in cases}) == 1
    # the FLOPs differ only by the router (2 T D E per forward, x3 with the backward)
    f = [c.flops() for c in cases]
    assert f[1] - f[0] == pytest.approx(3 * 2 * 4096 * 256 * 16)
    cf = harness.sweep_cases("capacity_factor", harness.LayerCase(), (0.5, 2.0))
    assert {c.dispatch for c in cf} == {"capacity"} and [c.capacity_factor for c in cf] == [0.5, 2.0]
    with pytest.raises(ValueError, match="sweep"):
        harness.sweep_cases("depth", harness.LayerCase())


def test_layer_flops_by_hand():
    # router 2 T D E + experts 2 T k (3 D H), times 3 for forward + backward
    assert TINY.flops() == 3 * (2 * 64 * 32 * 4 + 2 * 64 * 2 * 3 * 32 * 32)


def test_bad_cases_name_the_field():
    with pytest.raises(ValueError, match="top_k"):
        harness.LayerCase(num_experts=4, top_k=8)
    with pytest.raises(ValueError, match="routing"):
        harness.LayerCase(routing="greedy")
    with pytest.raises(ValueError, match="dispatches"):
        harness.ThroughputConfig(dispatches=("teleport",))


def test_a_layer_measurement_reports_consistent_figures():
    rec = harness.measure_torch_layer(TINY, repeats=3, warmup=1, matmul_peak_flops=1e11)
    assert rec["backend"] == "torch-cpu" and len(rec["step_s"]) == 3
    assert rec["step_s_median"] == statistics.median(rec["step_s"])
    assert rec["tokens_per_s"] == pytest.approx(64 / rec["step_s_median"])
    assert rec["mfu_measured_peak"] == pytest.approx(TINY.flops() / rec["step_s_median"] / 1e11)
    assert rec["dropped_fraction"] == 0  # sorted dispatch never drops
    if sys.platform == "linux":
        assert rec["peak_memory_bytes"] is not None and rec["peak_memory_bytes"] >= 0
    uniform = harness.measure_torch_layer(harness.LayerCase(**{**TINY.__dict__, "routing": "uniform",
                                                                 "dispatch": "capacity", "capacity_factor": 1.0}),
                                          repeats=1, warmup=0)
    assert uniform["dropped_fraction"] == 0  # forced balance fills every slot exactly


def test_capacity_drops_are_counted():
    rec = harness.measure_torch_layer(harness.LayerCase(**{**TINY.__dict__, "dispatch": "capacity",
                                                             "capacity_factor": 0.25}), repeats=1, warmup=0)
    assert rec["dropped_fraction"] >= 0.75  # at most a quarter of the assignments fit


def test_backends_found_at_run_time():
    found = {b.name: b for b in harness.discover_backends()}
    assert found["torch-cpu"].available
    assert set(found) == {"torch-cpu", "torch-cuda", "torch-npu", "mindspore"}
    for b in found.values():
        assert b.available or b.reason.endswith(".")  # one sentence
    if not torch.cuda.is_available():
        assert not found["torch-cuda"].available


def test_mindspore_missing_is_unavailable_not_an_error(monkeypatch):
    monkeypatch.setattr(harness, "mindspore_bench", lambda: (None, "MindSpore is not installed."))
    rec = harness.measure_mindspore("model", preset_name="tiny")
    assert rec == {"backend": "mindspore", "kind": "model", "available": False, "reason": "MindSpore is not installed."}


def test_mindspore_contract_is_read_as_agreed(monkeypatch):
    fake = types.SimpleNamespace(
        measure_train_step=lambda cfg, batch_size, mode="graph", steps=10, warmup=3, seed=0: {
            "step_s_median": 0.2, "step_s": [0.1, 0.2, 0.3], "tokens_per_step": batch_size * cfg.seq_len,
            "mode": mode, "device": "CPU", "mindspore_version": "2.10.0"},
        measure_layer=lambda moe_cfg, d_model, tokens, dispatch, mode="pynative", backward=True, repeats=10,
        warmup=3: {"step_s_median": 0.01, "step_s": [0.01], "tokens": tokens, "mode": mode, "device": "CPU",
                   "mindspore_version": "2.10.0"})
    monkeypatch.setattr(harness, "mindspore_bench", lambda: (fake, ""))
    rec = harness.measure_mindspore("model", preset_name="tiny", batch_size=2, mode="graph")
    assert rec["available"] and rec["mode"] == "graph" and rec["tokens"] == 2 * 128
    assert rec["tokens_per_s"] == pytest.approx(256 / 0.2)
    layer = harness.attach_prediction(harness.measure_mindspore("layer", case=TINY), pm.measured_device(1e11, 1e10))
    assert layer["tokens"] == 64 and layer["model_step_s"] > 0


def test_git_commit_and_environment():
    env = harness.environment()
    assert env["torch"] == torch.__version__ and env["date"].endswith("Z")
    commit = harness.git_commit()
    assert commit is None or len(commit.split("+")[0]) == 40


def test_a_smoke_run_is_json_ready_and_loads_back(tmp_path):
    cfg = harness.smoke_config(sweeps=("top_k",), dispatches=("sorted",), routings=("uniform",), mindspore=False)
    res = harness.run_throughput(cfg, log=lambda line: None)
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(res, allow_nan=False))
    (tmp_path / "layer.json").write_text(json.dumps({"config": {}}))  # another benchmark's file: skipped
    loaded = harness.load_results(sorted(tmp_path.glob("*.json")))
    assert len(loaded) == 1
    df = harness.records_table(loaded)
    # 2 layer passes + 4 top-k points + tiny forward and (uniform routing) forward + backward
    assert len(df) == 2 + 4 + 2
    assert (df["model_error"] == (df["model_step_s"] - df["step_s_median"]) / df["step_s_median"]).all()


def test_cli_model_and_devices(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["bench", "model", "--shapes", "mixtral-8x7b", "--devices", "H100,Ascend910B2", "--published",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 2 and {r["key"] for r in data["published"]} == {p.key for p in pm.PUBLISHED}
    assert main(["bench", "devices"]) == 0
    assert "contested" in capsys.readouterr().out
    assert main(["bench", "model", "--devices", "TPU"]) == 2
    assert "devices='TPU' is invalid" in capsys.readouterr().err


def test_cli_throughput_smoke_writes_json_and_figure(tmp_path):
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", "--smoke", "--sweeps", "", "--dispatches", "sorted", "--no-mindspore",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "throughput" and data["environment"]["git_commit"] != ""
    assert out.with_suffix(".png").exists()


def test_all_to_all_bytes_against_the_committed_expert_parallel_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "expert-parallel-cpu2-run1.json"
    check = harness.expert_parallel_check(json.loads(path.read_text()))
    # 2 ranks x 1 micro-batch of 16 x 256 tokens x 6 MoE layers x 4 exchanges x (2 x 256 fp32 values per
    # token) x half of them off-rank
    assert check["predicted_bytes"] == 2 * 1 * 6 * 4 * 4096 * 2 * 256 * 4 * 0.5
    assert check["error"] == pytest.approx(check["predicted_bytes"] / check["measured_bytes"] - 1)
