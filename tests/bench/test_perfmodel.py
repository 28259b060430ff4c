"""The analytic throughput model against hand-computed cases, and the device table's labels."""

from __future__ import annotations

import math

import pytest

from workbench.bench import perfmodel as pm
from workbench.config import ModelConfig, MoEConfig, preset


def _device(tflops: float, tb_s: float, **figures) -> pm.Device:
    figs = {"bf16_tflops": pm.Figure(value=tflops), "matmul_tflops": pm.Figure(value=tflops),
            "hbm_tb_s": pm.Figure(value=tb_s)}
    figs.update({k: pm.Figure(value=v) for k, v in figures.items()})
    return pm.Device(key="toy", name="toy", node_size=8, figures=figs)


# --- roofline ---------------------------------------------------------------------------------


def test_a_large_square_gemm_is_compute_bound():
    # 2 x 1024^3 FLOPs at 1 TFLOP/s; its 3 x 1024^2 bf16 elements at 1 TB/s take far less
    t = pm.gemm_time(1024, 1024, 1024, flops_per_s=1e12, bytes_per_s=1e12, dtype_bytes=2)
    assert t == pytest.approx(2 * 1024**3 / 1e12)


def test_a_one_row_gemm_is_memory_bound():
    # one token through a 4096 x 4096 bf16 weight: the weight's bytes dominate
    t = pm.gemm_time(1, 4096, 4096, flops_per_s=1e15, bytes_per_s=1e12, dtype_bytes=2)
    assert t == pytest.approx(2 * (1 * 4096 + 4096 * 4096 + 1 * 4096) / 1e12)


def test_arithmetic_intensity_is_about_the_rows_for_skinny_products():
    ai = pm.arithmetic_intensity(16, 4096, 4096, dtype_bytes=2)
    assert ai == pytest.approx(2 * 16 * 4096 * 4096 / (2 * (16 * 4096 + 4096 * 4096 + 16 * 4096)))
    assert 15 < ai < 16


def test_finer_experts_at_equal_active_flops_have_lower_intensity_and_take_longer_when_memory_bound():
    base = pm.shape("mixtral-8x7b")
    fine = pm.granular(base, 8)
    # same expert FLOPs per token; only the router grows (one D x E product per layer)
    router_growth = base.n_layers * base.d_model * (fine.num_experts - base.num_experts)
    assert fine.active_matmul_params() - base.active_matmul_params() == router_growth
    dev = _device(989, 3.35)
    coarse_p = pm.predict(base, dev, tokens=512)
    fine_p = pm.predict(fine, dev, tokens=512)
    assert fine_p.expert_intensity < coarse_p.expert_intensity
    assert fine_p.parts_s["experts"] > coarse_p.parts_s["experts"]


# --- all-to-all -------------------------------------------------------------------------------


def test_all_to_all_bytes_of_the_committed_expert_parallel_benchmark_setting():
    # small: 4,096 tokens per rank, top-2, d_model 256, fp32, EP=2: half the rows leave the rank,
    # 4 exchanges per training step
    per_layer = pm.all_to_all_bytes(4096, 2, 256, ep=2, dtype_bytes=4)
    assert per_layer == 4 * 4096 * 2 * 256 * 4 * 0.5 == 16_777_216
    assert pm.all_to_all_bytes(4096, 2, 256, ep=1, dtype_bytes=4) == 0
    assert pm.all_to_all_bytes(4096, 2, 256, ep=2, dtype_bytes=4, exchanges=2) == per_layer / 2


def test_all_to_all_time_splits_intra_and_inter_node_shares():
    # EP=16 on nodes of 8: 8 of the 15 other ranks are on another node
    t = pm.all_to_all_time(1.5e9, ep=16, node_size=8, intra_bytes_s=100e9, inter_bytes_s=10e9)
    assert t == pytest.approx(max(1.5e9 * 7 / 15 / 100e9, 1.5e9 * 8 / 15 / 10e9))
    assert pm.all_to_all_time(1e9, ep=8, node_size=8, intra_bytes_s=100e9, inter_bytes_s=None) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="a2a_inter_gb_s"):
        pm.all_to_all_time(1e9, ep=16, node_size=8, intra_bytes_s=100e9, inter_bytes_s=None)


# --- MFU and the whole prediction ---------------------------------------------------------------


def test_mfu_arithmetic():
    assert pm.mfu(6e9, 1000, 1e13) == pytest.approx(0.6)
    assert pm.relative_error(120, 100) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="peak_flops"):
        pm.mfu(1, 1, 0)


def test_with_unlimited_bandwidth_the_step_is_the_training_flops_over_the_compute_roof():
    shp = pm.shape("deepseek-v3")
    dev = _device(500, 1e18)  # bandwidth so large that nothing is memory-bound
    p = pm.predict(shp, dev, tokens=4096, ep=1)
    assert p.step_s == pytest.approx(4096 * shp.flops_per_token() / 500e12, rel=1e-9)
    assert p.mfu == pytest.approx(1.0, rel=1e-9)  # the toy's peak equals its matmul
    assert p.tokens_per_s == pytest.approx(4096 / p.step_s)
    assert p.step_s == pytest.approx(sum(p.parts_s.values()))
    fwd = pm.predict(shp, dev, tokens=4096, ep=1, backward=False)
    assert fwd.step_s == pytest.approx(p.step_s / 3)


def test_expert_parallel_adds_exactly_the_all_to_all_time():
    shp = pm.shape("qwen3-30b-a3b")
    dev = _device(989, 3.35, a2a_intra_gb_s=200)
    one, eight = pm.predict(shp, dev, tokens=4096, ep=1), pm.predict(shp, dev, tokens=4096, ep=8)
    a2a = shp.n_moe_layers * pm.all_to_all_bytes(4096, 8, 2048, ep=8, dtype_bytes=2) / 200e9
    assert eight.parts_s["all_to_all"] == pytest.approx(a2a)
    assert one.parts_s["all_to_all"] == 0
    # each rank holds 1/8 of the experts, each expert gets 8x the rows: same expert FLOPs per rank
    assert eight.expert_rows == 8 * one.expert_rows
    half = pm.predict(shp, dev, tokens=4096, ep=8, overlap=0.5)
    assert half.parts_s["all_to_all"] == pytest.approx(a2a / 2)
    with pytest.raises(ValueError, match="ep"):
        pm.predict(shp, dev, ep=3)


def test_a_workbench_preset_has_the_configs_exact_flops():
    for cfg in (preset("tiny"), preset("small"),
                ModelConfig(n_layers=4, first_dense_layers=1, moe_every=2, tie_embeddings=True,
                            moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64, num_shared_experts=1))):
        shp = pm.shape_from_model_config(cfg)
        assert shp.flops_per_token() == cfg.flops_per_token()
        norms = cfg.d_model * (2 * cfg.n_layers + 1)
        assert shp.num_params() == cfg.num_params() - norms


def test_published_deepseek_v3_rate_is_the_reports_gpu_hours_per_trillion_tokens():
    p = next(p for p in pm.PUBLISHED if p.key == "deepseek-v3-h800")
    assert p.value == pytest.approx(1e12 / (180_000 * 3600))  # about 1,543 tokens/s per GPU
    assert round(p.value) == 1543


def test_every_published_point_gets_a_prediction_and_an_error():
    rows = pm.published_errors(ends=("value",))
    assert {r["key"] for r in rows} == {p.key for p in pm.PUBLISHED}
    for r in rows:
        assert math.isfinite(r["predicted"]) and r["error"] == pytest.approx(r["predicted"] / r["published"] - 1)


# --- the device table -------------------------------------------------------------------------


def test_the_device_table_has_every_device_and_a_source_for_every_figure():
    devices = pm.load_devices()
    assert {"A100", "H100", "H200", "H800", "Ascend910B", "Ascend910B2", "Ascend910C", "this_machine"} <= set(devices)
    for dev in devices.values():
        for name, f in dev.figures.items():
            assert f.source, f"{dev.key}.{name} has no source"


def test_ascend_peaks_are_labelled_contested_with_a_band():
    devices = pm.load_devices()
    for key in ("Ascend910B", "Ascend910B2", "Ascend910C"):
        f = devices[key].figures["bf16_tflops"]
        assert f.status == "contested" and f.low < f.high
        assert "bf16_tflops" in devices[key].contested()
    # a peak cannot be below a matmul measured on the chip
    b2 = devices["Ascend910B2"]
    assert b2.figures["bf16_tflops"].low >= b2.figures["matmul_tflops"].high


def test_the_ascend_band_moves_the_prediction():
    dev = pm.load_devices()["Ascend910B2"]
    shp = pm.shape("qwen3-30b-a3b")
    low, high = (pm.predict(shp, dev, ep=8, end=e).tokens_per_s for e in ("low", "high"))
    assert low < high


def test_a_malformed_device_entry_is_refused_by_name():
    with pytest.raises(ValueError, match=r"X\.bf16_tflops"):
        pm.parse_devices({"X": {"name": "x", "bf16_tflops": 5}})
    with pytest.raises(ValueError, match="unknown figures"):
        pm.parse_devices({"X": {"name": "x", "bogus": {"value": 1}}})
    with pytest.raises(ValueError, match=r"X\.hbm_tb_s"):
        pm.parse_devices({"X": {"name": "x", "hbm_tb_s": {"value": 2, "low": 3, "high": 4}}})


def test_a_measured_machine_predicts_with_its_own_peak():
    dev = pm.measured_device(100e9, 20e9, dtype="fp32")
    shp = pm.shape_from_model_config(preset("tiny"))
    p = pm.predict(shp, dev, tokens=2048, dtype="fp32")
    assert p.mfu == pytest.approx(p.mfu_matmul)
    assert p.ridge == pytest.approx(100e9 / 20e9)
    with pytest.raises(ValueError, match="matmul_flops"):
        pm.measured_device(0, 1)


def test_bad_arguments_name_themselves():
    dev = _device(989, 3.35)
    with pytest.raises(ValueError, match="dtype"):
        pm.predict(pm.shape("mixtral-8x7b"), dev, dtype="int4")
    with pytest.raises(ValueError, match="overlap"):
        pm.predict(pm.shape("mixtral-8x7b"), dev, overlap=2)
    with pytest.raises(ValueError, match="shape"):
        pm.shape("gpt-5")
    with pytest.raises(ValueError, match="factor"):
        pm.granular(pm.shape("mixtral-8x7b"), 3)
