"""A short training run per router, measured before and after, and the table made from runs."""

from __future__ import annotations

import math

import torch

from workbench.analysis import (
    CAUSAL_TOLERANCE,
    analyze_router,
    fixed_batch,
    router_takeaways,
    summary_rows,
    train_router,
)
from workbench.moe import ROUTERS


def test_train_router_init_equals_an_untrained_model_and_training_changes_it(micro_data, micro):
    batch = fixed_batch(micro_data, 2)
    run = train_router("softmax_topk", micro_data, batch.tokens, steps=3, num_experts=4, top_k=2, seed=7,
                       base=micro, train_overrides={"warmup_steps": 1, "lr": 1e-2})
    direct = analyze_router("softmax_topk", batch.tokens, num_experts=4, top_k=2, seed=7, base=micro)
    assert run.init.balance() == direct.balance()
    for a, b in zip(run.init.routing, direct.routing, strict=True):
        assert torch.equal(a.router_output.scores_TE, b.router_output.scores_TE)
    assert run.steps == 3 and [r["step"] for r in run.history] == [1, 2, 3]
    assert not torch.equal(run.trained.routing[0].router_output.scores_TE, run.init.routing[0].router_output.scores_TE)
    for value in (*run.trained.balance().values(), run.val_loss, run.tokens_per_s, *run.leak.values()):
        assert math.isfinite(value)
    assert run.causal("eval") and run.causal("train")
    assert run.causal("eval", tolerance=-1.0) is False  # the tolerance is what decides


def test_every_router_trains_and_the_table_and_takeaways_follow_the_runs(micro_data, micro):
    batch = fixed_batch(micro_data, 1)
    runs = {name: train_router(name, micro_data, batch.tokens, steps=1, num_experts=4, top_k=2, base=micro,
                               train_overrides={"warmup_steps": 1})
            for name in ROUTERS}
    rows = summary_rows(runs)
    assert [r["router"] for r in rows] == list(ROUTERS)
    by_name = {r["router"]: r for r in rows}
    assert by_name["switch"]["top_k"] == 1
    assert not by_name["expert_choice"]["causal_eval"] and not by_name["soft_moe"]["causal_eval"]
    assert by_name["softmax_topk"]["causal_eval"] and by_name["softmax_topk"]["causal_train"]
    assert by_name["uniform"]["max_vio_trained"] == 0
    for name, run in runs.items():
        assert by_name[name]["causal_eval"] == (run.leak["eval"] <= CAUSAL_TOLERANCE)
        assert by_name[name]["val_loss"] == run.val_loss
    lines = router_takeaways(rows)
    # uniform is perfectly balanced, so it is among the lowest MaxVio after training (0.000)
    lowest = lines[0].split(": ")[1].split(" (")[0].split(", ")
    assert "uniform" in lowest and lines[0].startswith("lowest MaxVio after training: ")
    assert "(0.000)" in lines[0]
    not_comparable = next(line for line in lines if line.startswith("lowest validation loss"))
    assert not_comparable.endswith(", ".join(r["router"] for r in rows if not r["causal_eval"]))
