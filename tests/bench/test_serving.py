"""The serving model against hand-computed cases, and the published serving figures' table. No timings."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from workbench.bench import perfmodel as pm
from workbench.bench import serving as sv

ROOT = Path(__file__).resolve().parents[2]


def _device(tflops: float, tb_s: float, hbm_gb: float | None = None, **figures) -> pm.Device:
    figs = {"bf16_tflops": pm.Figure(value=tflops), "matmul_tflops": pm.Figure(value=tflops),
            "hbm_tb_s": pm.Figure(value=tb_s)}
    if hbm_gb is not None:
        figs["hbm_gb"] = pm.Figure(value=hbm_gb)
    figs.update({k: pm.Figure(value=v) for k, v in figures.items()})
    return pm.Device(key="toy", name="toy", node_size=8, figures=figs)


# A toy MoE: layer 0 dense (FFN 24), layer 1 MoE (4 experts of 16, top-1); GQA with 2 query heads
# and 1 KV head of 4
TOY = pm.Shape(name="toy", n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, vocab_size=32, seq_len=64,
               num_experts=4, top_k=1, expert_hidden=16, dense_hidden=24, first_dense_layers=1)
# A toy dense model: one MHA layer of one 64-wide head, FFN 128, vocabulary 16
DENSE = pm.Shape(name="dense", n_layers=1, d_model=64, n_heads=1, head_dim=64, vocab_size=16, seq_len=8,
                 dense_hidden=128)


# --- distinct experts ---------------------------------------------------------------------------


def _monte_carlo(draw_token, batch: int, trials: int) -> float:
    return sum(len(set().union(*(draw_token() for _ in range(batch)))) for _ in range(trials)) / trials


def test_uniform_distinct_experts_is_the_closed_form_and_matches_monte_carlo():
    E, k, B = 16, 2, 8
    closed = E * (1 - (1 - k / E) ** B)
    assert sv.expected_distinct_experts(E, k, B) == pytest.approx(closed)
    rng = random.Random(0)
    mc = _monte_carlo(lambda: rng.sample(range(E), k), B, 20000)
    # the count's standard deviation is below 2, so 20,000 trials leave a standard error below 0.015
    assert mc == pytest.approx(closed, abs=0.06)


def test_distinct_experts_under_a_measured_load_match_resampling_its_trace():
    # a skewed trace: each token picks k distinct experts by successive weighted draws (as a top-k
    # router without replacement does); its per-expert counts are the load
    E, k, B = 8, 2, 6
    rng = random.Random(1)
    weights = [2.0 ** -i for i in range(E)]

    def pick():
        left, chosen = list(range(E)), []
        for _ in range(k):
            e = rng.choices(left, [weights[i] for i in left])[0]
            left.remove(e)
            chosen.append(e)
        return chosen

    trace = [pick() for _ in range(4000)]
    load = [sum(e in t for t in trace) for e in range(E)]
    expected = sv.expected_distinct_experts(E, k, B, load)
    # decode batches are independent tokens: resample the trace's tokens
    mc = _monte_carlo(lambda: rng.choice(trace), B, 20000)
    assert mc == pytest.approx(expected, abs=0.05)
    assert expected < sv.expected_distinct_experts(E, k, B)  # skew: fewer experts than uniform


def test_a_uniform_load_gives_the_closed_form_and_one_token_touches_k_experts():
    assert sv.expected_distinct_experts(64, 6, 32, [5] * 64) == pytest.approx(sv.expected_distinct_experts(64, 6, 32))
    assert sv.expected_distinct_experts(256, 8, 1) == pytest.approx(8)
    # a steep Zipf law asks more than one pick per token of the top experts: capped, the rest renormalised
    assert sv.expected_distinct_experts(256, 8, 1, sv.zipf_load(256, 1.5)) == pytest.approx(8)
    assert sv.inclusion_probabilities([0.5, 0.3, 0.1, 0.1], 2) == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert sv.inclusion_probabilities([0.7, 0.1, 0.1, 0.1], 2) == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])


def test_zipf_fit_recovers_the_exponent_and_a_flat_load_is_zero():
    assert sv.zipf_fit(sv.zipf_load(64, 1.2)) == pytest.approx(1.2)
    assert sv.zipf_fit([3, 3, 3, 3]) == pytest.approx(0.0, abs=1e-12)
    assert sv.zipf_fit([0, 4, 1, 0, 2]) == pytest.approx(sv.zipf_fit([4, 2, 1]))  # order and zeros ignored


@pytest.mark.parametrize("bad", [[1, 2, 3], [0, 0, 0, 0], [1, -1, 1, 1]])
def test_a_malformed_load_is_refused(bad):
    with pytest.raises(ValueError, match="load"):
        sv.expected_distinct_experts(4, 1, 2, bad)


# --- KV cache ---------------------------------------------------------------------------------------


def test_mla_keeps_its_latent_a_factor_2_nh_dh_over_dc_plus_dr_below_mha():
    mla = pm.shape("deepseek-v3")
    mha = mla.replace(attention="gqa", n_kv_heads=None)  # same heads, full keys and values
    assert sv.kv_elements_per_token(mla) == 512 + 64
    assert sv.kv_elements_per_token(mha) == 2 * 128 * 128
    factor = 2 * mla.n_heads * mla.head_dim / (mla.kv_lora_rank + mla.rope_dim)
    assert sv.kv_bytes_per_token(mha) / sv.kv_bytes_per_token(mla) == pytest.approx(factor)
    assert factor == pytest.approx(56.9, abs=0.05)
    # 61 layers of 576 bf16 elements: 70,272 bytes per token
    assert sv.kv_bytes_per_token(mla) == 61 * 576 * 2


def test_gqa_and_sliding_windows_in_the_kv_cache():
    oss = pm.shape("gpt-oss-120b")  # 36 layers, 8 KV heads of 64, every other layer a 128-token window
    assert sv.kv_elements_per_token(oss) == 2 * 8 * 64
    per = 2 * 8 * 64 * 2
    assert sv.kv_cache_bytes(oss, 4096) == pytest.approx(per * (18 * 128 + 18 * 4096))
    assert sv.kv_cache_bytes(oss, 100) == pytest.approx(per * 36 * 100)


# --- decode -----------------------------------------------------------------------------------------


def test_decode_bytes_of_the_toy_shape_by_hand():
    p = sv.predict_decode(TOY, _device(1, 1), batch=2, context=10)
    # attention per layer: q 8x8, kv 8x(2x1x4), out 8x8 = 192 weights, 2 layers, bf16
    assert p.bytes_read["attention_weights"] == 2 * 192 * 2
    # KV: 2 x 1 x 4 elements per token and layer, 10 tokens, 2 layers, 2 sequences, bf16
    assert p.bytes_read["kv_cache"] == 2 * (8 * 10 * 2) * 2
    # 2 tokens, top-1 of 4 uniform: 4 (1 - (3/4)^2) = 1.75 experts of 3 x 8 x 16, in the one MoE layer
    assert p.distinct_experts == pytest.approx(1.75)
    assert p.bytes_read["expert_weights"] == pytest.approx(1.75 * 3 * 8 * 16 * 2)
    # router 8x4, the dense layer's FFN 3 x 8 x 24, the LM head 32 x 8
    assert p.bytes_read["other_weights"] == (8 * 4 + 3 * 8 * 24 + 32 * 8) * 2
    # FLOPs: 2 per weight a token meets (one expert of the 4) + 2 x 2 heads x (4 + 4) per cached key
    weights_met = 2 * 192 + 8 * 4 + 3 * 8 * 16 + 3 * 8 * 24 + 32 * 8
    assert p.flops == pytest.approx(2 * 2 * weights_met + 2 * 2 * (2 * 10) * (2 * 2 * 4))


def test_memory_bound_turns_compute_bound_at_the_hand_computed_batch():
    dev = _device(1, 0.1)  # 1 TFLOP/s, 0.1 TB/s: ridge 10 FLOP/byte
    F, BW = 1e12, 1e11
    weights = (64 * 64 + 64 * 128 + 64 * 64) + 3 * 64 * 128 + 16 * 64  # attention, FFN, LM head
    context = 4
    flops_per_seq = 2 * (weights + context * 2 * 64)  # + scores and values over 4 keys, one 64-wide head
    kv_per_seq = context * 2 * 64 * 2
    # compute time = memory time: B flops_per_seq / F = (2 weights + B kv_per_seq) / BW
    switch = (2 * weights / BW) / (flops_per_seq / F - kv_per_seq / BW)
    assert 11 < switch < 12
    below = sv.predict_decode(DENSE, dev, batch=11, context=context)
    above = sv.predict_decode(DENSE, dev, batch=12, context=context)
    assert below.bound == "memory" and above.bound == "compute"
    assert below.memory_s == pytest.approx((2 * weights + 11 * kv_per_seq) / BW)
    assert above.compute_s == pytest.approx(12 * flops_per_seq / F)


def test_weight_precision_scales_the_weight_bytes_not_the_kv_cache():
    dev = _device(989, 3.35, fp8_tflops=1979)
    bf16 = sv.predict_decode(pm.shape("qwen3-30b-a3b"), dev, batch=16, context=2048)
    fp8 = sv.predict_decode(pm.shape("qwen3-30b-a3b"), dev, batch=16, context=2048, precision="fp8")
    int4 = sv.predict_decode(pm.shape("qwen3-30b-a3b"), dev, batch=16, context=2048, precision="int4")
    for part in ("attention_weights", "expert_weights", "other_weights"):
        assert fp8.bytes_read[part] == pytest.approx(bf16.bytes_read[part] / 2)
        assert int4.bytes_read[part] == pytest.approx(bf16.bytes_read[part] / 4)
    assert fp8.bytes_read["kv_cache"] == bf16.bytes_read["kv_cache"]
    assert sv.weight_bytes_per_device(TOY, "fp8") == pytest.approx(sv.weight_bytes_per_device(TOY, "bf16") / 2)
    # fp8 GEMMs run on the fp8 peak; int4 is weight-only (bf16 GEMMs); no int8 peak: bf16 too
    assert sv.compute_dtype("fp8", dev) == "fp8"
    assert sv.compute_dtype("int4", dev) == "bf16"
    assert sv.compute_dtype("int8", dev) == "bf16"


def test_max_batch_by_hand():
    dev = _device(1, 1, hbm_gb=1e-3)  # 1 MB of device memory
    weights = 2 * DENSE.num_params()  # untied embedding and LM head, attention, FFN; bf16
    assert sv.weight_bytes_per_device(DENSE) == weights == 2 * (2 * 16 * 64 + 2 * 64 * 64 + 64 * 128 + 3 * 64 * 128)
    kv = 4 * 2 * 64 * 2  # 4 tokens x (key + value of 64) x bf16
    assert sv.max_batch(DENSE, dev, context=4) == math.floor((0.9 * 1e6 - weights) / kv) == 794
    assert sv.max_batch(DENSE, dev, context=4, memory_fraction=0.05) == 0  # the weights alone do not fit
    assert sv.predict_decode(DENSE, dev, batch=1, context=4).max_batch == 794


def test_expert_parallelism_holds_a_share_of_the_experts_and_pays_the_all_to_all():
    shp = pm.shape("deepseek-v3")
    dev = pm.load_devices()["H800"]
    # 256 routed + 32 redundant slots over 144 GPUs: 2 per GPU (DeepSeek's decode deployment)
    assert sv.expert_slots_per_device(shp, 144, 32) == 2
    full, split = sv.weight_bytes_per_device(shp, "fp8"), sv.weight_bytes_per_device(shp, "fp8", 144, 32)
    assert full - split == pytest.approx((256 - 2) * 3 * 7168 * 2048 * 58)
    p = sv.predict_decode(shp, dev, batch=64, context=4096, precision="fp8", ep=144, redundant_experts=32,
                          dispatch_dtype="fp8", combine_dtype="bf16")
    assert p.distinct_experts == pytest.approx(sv.expected_distinct_experts(256, 8, 64 * 144))
    assert p.experts_touched == pytest.approx(2 * p.distinct_experts / 256)
    # dispatch (1 byte) and combine (2 bytes) of 64 x 8 rows of 7,168 per MoE layer, 143/144 off the GPU
    assert p.a2a_bytes == pytest.approx(64 * 8 * 7168 * (143 / 144) * 3 * 58)
    assert p.parts_s["all_to_all"] == pytest.approx(p.a2a_s)  # no overlap: all of it is exposed
    hidden = sv.predict_decode(shp, dev, batch=64, context=4096, precision="fp8", ep=144, redundant_experts=32,
                               dispatch_dtype="fp8", combine_dtype="bf16", overlap=1.0)
    assert hidden.step_s == pytest.approx(max(hidden.step_s - hidden.parts_s["all_to_all"], hidden.a2a_s))


def test_multi_token_prediction_makes_1_plus_a_tokens_per_step():
    dev = _device(1, 1)
    one = sv.predict_decode(TOY, dev, batch=4, context=10)
    mtp = sv.predict_decode(TOY, dev, batch=4, context=10, mtp_tokens=1, mtp_acceptance=0.7)
    assert mtp.tokens_per_step == pytest.approx(1.7)
    assert mtp.tpot_s == pytest.approx(mtp.step_s / 1.7)
    assert mtp.tokens_per_s == pytest.approx(4 * 1.7 / mtp.step_s)
    assert mtp.bytes_read["kv_cache"] == one.bytes_read["kv_cache"]  # the drafts share the sequence's cache


def test_decode_refuses_an_unknown_routing():
    with pytest.raises(ValueError, match="routing"):
        sv.predict_decode(TOY, _device(1, 1), batch=1, context=4, routing="zipf")


# --- prefill ----------------------------------------------------------------------------------------


def test_prefill_is_the_forward_roofline_at_the_causal_span_plus_the_kv_write():
    dev = _device(989, 3.35, a2a_intra_gb_s=350)
    shp = pm.shape("mixtral-8x7b")
    f = sv.predict_prefill(shp, dev, prompt_len=1000, batch=4, ep=8)
    fwd = pm.predict(shp.replace(seq_len=501), dev, tokens=4000, ep=8, backward=False)
    kv = 4 * 1000 * 32 * (2 * 8 * 128) * 2 / 3.35e12
    assert f.forward_s == pytest.approx(fwd.step_s)
    assert f.kv_write_s == pytest.approx(kv)
    assert f.tokens_per_s == pytest.approx(4000 / (fwd.step_s + kv))


def test_int8_prefill_runs_on_the_int8_peak():
    dev = _device(400, 1.6, int8_tflops=800)
    bf16 = sv.predict_prefill(pm.shape("qwen3-30b-a3b"), dev, prompt_len=4096, batch=4)
    int8 = sv.predict_prefill(pm.shape("qwen3-30b-a3b"), dev, prompt_len=4096, batch=4, precision="int8")
    assert int8.forward_s < 0.6 * bf16.forward_s  # compute-bound at 16K tokens: about half


# --- published figures and this machine -------------------------------------------------------------


def test_the_published_serving_table_loads_with_every_source_and_setting():
    figures = sv.load_published()
    keys = {p.key for p in figures}
    assert {"deepseek-online-prefill-h800", "deepseek-online-decode-h800", "cloudmatrix-prefill-910c",
            "cloudmatrix-decode-50ms-910c", "cloudmatrix-decode-15ms-910c", "sglang-decode-h100"} <= keys
    devices = pm.load_devices()
    for p in figures:
        assert p.source.strip() and p.setting.strip(), p.key
        assert p.device in devices and p.model in pm.SHAPES
    by_key = {p.key: p for p in figures}
    assert by_key["deepseek-online-decode-h800"].per_device == pytest.approx(14800 / 8)
    assert by_key["deepseek-online-prefill-h800"].per_device == pytest.approx(73700 / 8)
    assert by_key["cloudmatrix-decode-50ms-910c"].per_device == 1943
    rows = sv.serving_errors()
    assert [r["key"] for r in rows] == [p.key for p in figures]
    for r in rows:
        assert r["predicted"] > 0 and math.isfinite(r["error"])
        assert r["error"] == pytest.approx((r["predicted"] - r["published"]) / r["published"])
    assert "error" in sv.format_serving_errors(rows)


def test_a_malformed_published_entry_is_named():
    entry = {"model": "deepseek-v3", "device": "H800", "phase": "decode", "value": 1, "per": "device",
             "source": "x", "setting": "y", "uncertain": ""}
    with pytest.raises(ValueError, match="batch and context"):
        sv.parse_published({"bad": entry})
    with pytest.raises(ValueError, match="unknown fields"):
        sv.parse_published({"bad": {**entry, "batch": 1, "context": 2, "tpot": 3}})


def test_measured_points_of_a_committed_generation_benchmark():
    path = ROOT / "benchmarks" / "generate-small-cpu2-2026-12-06.json"
    result = json.loads(path.read_text())
    dev = pm.measured_device(1e11, 1e10)  # given, so that the test measures nothing
    rows = sv.measured_decode_errors(str(path), dev)
    assert len(rows) == 2 * len(result["rows"])
    decode = [r for r in rows if r["phase"] == "decode"]
    assert [r["measured"] for r in decode] == [r["cached"]["decode_tokens_per_s"] for r in result["rows"]]
    for r in rows:
        assert r["error"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"])
    assert "decode" in sv.format_measured_errors(rows)


def test_cli_bench_serve_prints_every_published_figure_and_refuses_bad_values(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(p.key in printed for p in sv.load_published())
    data = json.loads(out.read_text())
    assert len(data["published"]) == len(sv.load_published()) and data["measured"] == []
    assert main(["bench", "serve", "--measured", str(tmp_path / "missing.json")]) == 2
    assert "measured=" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "serve", "--end", "middle"])
    assert exit_.value.code == 2
    assert "invalid choice: 'middle'" in capsys.readouterr().err
    bad = tmp_path / "published.yaml"
    bad.write_text("x: {model: deepseek-v3}\n")
    assert main(["bench", "serve", "--published-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks" in err


def test_cli_bench_serve_on_a_committed_generation_run_with_given_machine_figures(tmp_path, capsys):
    from workbench.cli import main

    path = ROOT / "benchmarks" / "generate-tiny-cpu2-2026-12-06.json"
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--measured", str(path), "--matmul-gflops", "100", "--bandwidth-gb-s", "10",
                 "--json", str(out)]) == 0
    measured = json.loads(out.read_text())["measured"]
    assert {r["phase"] for r in measured} == {"prefill", "decode"} and measured[0]["bandwidth_gb_s"] == 10
    assert "given" in capsys.readouterr().out
    assert main(["bench", "serve", "--measured", str(path), "--matmul-gflops", "100"]) == 2
    assert "--bandwidth-gb-s" in capsys.readouterr().err
    assert main(["bench", "serve", "--measured", str(path), "--matmul-gflops", "-1", "--bandwidth-gb-s", "10"]) == 2
    assert "matmul_flops" in capsys.readouterr().err
