"""`workbench bench train`: the MoE and its dense twin take turns; the ratio is per round."""

from __future__ import annotations

import statistics

from workbench.bench.train import format_train_bench, run_train_bench
from workbench.config import preset


def test_moe_and_dense_twin_alternate_and_the_ratio_is_the_median_of_rounds():
    results = run_train_bench(["tiny"], steps=3, warmup=1, batch_size=2, dense=True, steps_per_round=1)
    moe, dense = results["runs"]
    assert moe["preset"] == "tiny" and dense["preset"] == "tiny (dense)"
    assert moe["params"] == preset("tiny").num_params() and dense["params"] == preset("tiny").replace(
        moe=None).num_params()
    assert len(moe["vs_dense_per_round"]) == 3 and "vs_dense" not in dense
    assert moe["vs_dense"] == statistics.median(moe["vs_dense_per_round"])
    assert all(r > 0 for r in moe["vs_dense_per_round"]) and moe["tokens_per_s"] > 0
    text = format_train_bench(results)
    assert f"{moe['vs_dense']:.3f}x" in text and "median over 3 rounds" in text
