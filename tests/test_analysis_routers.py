"""The router comparison behind notebooks/01_routers.ipynb: one fixed batch, a short run, the table."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from workbench.analysis import (
    analyze_router,
    describe_routers,
    fixed_batch,
    future_leak,
    route_batch,
    router_config,
    router_takeaways,
    summary_rows,
    train_router,
)
from workbench.analysis.routers import CAUSAL_TOLERANCE, build_model
from workbench.config import ModelConfig, MoEConfig
from workbench.data import Corpus, Document, LMData
from workbench.moe import ROUTERS, CausalLeakWarning
from workbench.moe.dispatch import expert_capacity

# Small enough that a forward takes milliseconds; 4 experts, top-2, two MoE layers.
MICRO = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def micro_data():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "mixture", "expert", "router", "token"]
    docs = [Document(f"words/{i}", "words", " ".join(rng.choice(words) for _ in range(300)), "test")
            for i in range(6)]
    docs += [Document(f"numbers/{i}", "numbers",
                      "\n".join(f"{rng.randint(0, 999)} + {rng.randint(0, 999)}" for _ in range(150)), "test")
             for i in range(6)]
    corpus = Corpus(["words", "numbers"], docs)
    return LMData(corpus, seq_len=32, batch_size=4, seed=0, val_fraction=0.3, val_windows_per_domain=2)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_routes_the_batch_and_counts_every_assignment(router, tokens):
    result = analyze_router(router, tokens, num_experts=4, top_k=2, base=MICRO)
    T = tokens.numel()
    assert result.layers == MICRO.moe_layers and len(result.metrics) == len(MICRO.moe_layers)
    for layer, m in zip(result.layers, result.metrics, strict=True):
        info = result.layer_info(layer)
        loads = torch.tensor(m["tokens_per_expert"])
        mask = info.router_output.mask_TK
        # the load counts every real assignment: T * K for token choice, the real slots for expert choice
        real = T * result.top_k if mask is None else int(mask.sum())
        assert loads.sum().item() == real
        assert result.gates(layer).numel() == real
        # dropped assignments are exactly the overflow beyond the capacity, whichever were dropped
        if info.stats.capacity is not None:
            overflow = (loads - info.stats.capacity).clamp(min=0).sum().item()
            assert m["dropped_fraction"] == pytest.approx(overflow / real)
        for key in ("max_vio", "cv", "entropy", "router_confidence", "mean_gate"):
            assert math.isfinite(m[key]), key
    panel = result.panel_data(result.layers[0], length=10)
    assert len(panel["token_strings"]) == 10 and panel["expert_ids_TK"].shape[0] == 10


def test_capacity_is_the_stated_factor(tokens):
    result = analyze_router("softmax_topk", tokens, num_experts=4, top_k=2, capacity_factor=1.0, base=MICRO)
    assert result.metrics[0]["capacity"] == expert_capacity(tokens.numel(), 2, 4, 1.0)
    dropless = analyze_router("softmax_topk", tokens, num_experts=4, top_k=2, capacity_factor=None, base=MICRO)
    assert dropless.metrics[0]["capacity"] is None and dropless.balance()["dropped_fraction"] == 0


def test_uniform_router_is_exactly_balanced(tokens):
    result = analyze_router("uniform", tokens, num_experts=4, top_k=2, base=MICRO)
    b = result.balance()
    assert b["max_vio"] == 0 and b["cv"] == 0 and b["unused_experts"] == 0 and b["dropped_fraction"] == 0
    assert b["entropy"] == pytest.approx(1.0)


def test_expert_choice_gives_every_expert_the_same_tokens(tokens):
    result = analyze_router("expert_choice", tokens, num_experts=4, top_k=2, base=MICRO)
    for layer in result.layers:
        info = result.layer_info(layer)
        loads = info.tokens_per_expert
        assert (loads == loads[0]).all()
        assert result.layer_metrics(layer)["dropped_fraction"] == 0
        # padding slots are not gates: every real gate is a positive probability
        assert (result.gates(layer) > 0).all()


def test_switch_and_top_k_adjustments_are_notes():
    cfg, notes = router_config("switch", num_experts=4, top_k=2, base=MICRO)
    assert cfg.moe.top_k == 1 and any("top_k=1" in n for n in notes)
    cfg, notes = router_config("softmax_topk", num_experts=4, top_k=6, base=MICRO)
    assert cfg.moe.top_k == 4 and notes
    cfg, notes = router_config("softmax_topk", num_experts=4, top_k=2, base=MICRO)
    assert cfg.moe.dispatch == "capacity" and notes == []
    with pytest.raises(ValueError, match="softmax_topk"):
        router_config("no_such_router")


@pytest.mark.parametrize("router", ["expert_choice", "soft_moe"])
def test_causal_leak_warnings_become_notes(router, tokens):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze_router(router, tokens, num_experts=4, top_k=2, base=MICRO)
    assert not [w for w in caught if issubclass(w.category, CausalLeakWarning)]
    assert any("not causal" in n for n in result.notes)


def test_measurement_is_reproducible_and_leaves_the_generator_alone(tokens):
    cfg, _ = router_config("random", num_experts=4, top_k=2, base=MICRO)
    model, _ = build_model(cfg, seed=3)
    model.eval()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = route_batch(model, tokens, seed=5), route_batch(model, tokens, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.routing[0].router_output.expert_ids_TK, b.routing[0].router_output.expert_ids_TK)
    other = route_batch(model, tokens, seed=6)
    assert not torch.equal(a.routing[0].router_output.expert_ids_TK, other.routing[0].router_output.expert_ids_TK)
    assert a.train_mode and not model.training  # routed in training mode, the model's mode restored


def test_future_leak_separates_causal_and_non_causal_routers(tokens):
    def leak(router, **kw):
        cfg, _ = router_config(router, num_experts=4, top_k=2, base=MICRO)
        model, _ = build_model(cfg, seed=0)
        return future_leak(model, tokens, **kw)

    assert leak("softmax_topk", train_mode=True) <= CAUSAL_TOLERANCE
    assert leak("softmax_topk", train_mode=False) <= CAUSAL_TOLERANCE
    assert leak("expert_choice", train_mode=True) > CAUSAL_TOLERANCE
    assert leak("soft_moe", train_mode=False) > CAUSAL_TOLERANCE
    with pytest.raises(ValueError, match="split"):
        leak("softmax_topk", split=tokens.shape[1])


def test_fixed_batch_takes_windows_from_every_domain(micro_data):
    batch = fixed_batch(micro_data, sequences_per_domain=2)
    assert batch.tokens.shape == (4, 32)
    assert batch.domains[:, 0].tolist() == [0, 0, 1, 1]
    assert torch.equal(fixed_batch(micro_data, 2).tokens, batch.tokens)


def test_train_router_init_equals_an_untrained_model_and_training_changes_it(micro_data):
    batch = fixed_batch(micro_data, 2)
    run = train_router("softmax_topk", micro_data, batch.tokens, steps=3, num_experts=4, top_k=2, seed=7,
                       base=MICRO, train_overrides={"warmup_steps": 1, "lr": 1e-2})
    direct = analyze_router("softmax_topk", batch.tokens, num_experts=4, top_k=2, seed=7, base=MICRO)
    assert run.init.balance() == direct.balance()
    for a, b in zip(run.init.routing, direct.routing, strict=True):
        assert torch.equal(a.router_output.scores_TE, b.router_output.scores_TE)
    assert run.steps == 3 and len(run.history) == 3
    assert not torch.equal(run.trained.routing[0].router_output.scores_TE, run.init.routing[0].router_output.scores_TE)
    for value in (*run.trained.balance().values(), run.val_loss, run.tokens_per_s, *run.leak.values()):
        assert math.isfinite(value)
    assert run.causal("eval")


def test_summary_rows_cover_every_router(micro_data):
    batch = fixed_batch(micro_data, 1)
    runs = {name: train_router(name, micro_data, batch.tokens, steps=1, num_experts=4, top_k=2, base=MICRO,
                               train_overrides={"warmup_steps": 1})
            for name in ROUTERS}
    rows = summary_rows(runs)
    assert [r["router"] for r in rows] == list(ROUTERS)
    by_name = {r["router"]: r for r in rows}
    assert by_name["switch"]["top_k"] == 1
    assert not by_name["expert_choice"]["causal_eval"] and not by_name["soft_moe"]["causal_eval"]
    assert by_name["softmax_topk"]["causal_eval"] and by_name["softmax_topk"]["causal_train"]
    assert by_name["uniform"]["max_vio_trained"] == 0
    lines = router_takeaways(rows)
    assert lines and all(isinstance(line, str) for line in lines)
    assert {r["router"] for r in describe_routers()} == set(ROUTERS)


def _row(router, max_vio, dropped, val_loss, causal_eval=True, causal_train=True, tokens_per_s=1000.0, unused=0,
         leak_capacity=0.0):
    return {"router": router, "max_vio_init": 1.0, "max_vio_trained": max_vio, "dropped_trained": dropped,
            "unused_trained": unused, "val_loss": val_loss, "causal_eval": causal_eval, "causal_train": causal_train,
            "tokens_per_s": tokens_per_s, "leak_eval_capacity": leak_capacity}


def test_takeaways_report_the_extremes_of_the_rows():
    rows = [_row("a", 0.5, 0.1, 3.0, tokens_per_s=500.0),
            _row("b", 0.1, 0.0, 2.5, causal_eval=False, causal_train=False, unused=2),
            _row("c", 2.0, 0.3, 2.8, causal_train=False, tokens_per_s=900.0, leak_capacity=0.5)]
    text = "\n".join(router_takeaways(rows))
    assert "lowest MaxVio after training: b (0.100); highest: c (2.000)" in text
    assert "for 2 of 3 routers: a, b" in text
    assert "most assignments dropped after training: c (30.0%)" in text and "dropped nothing on the batch: b" in text
    assert "b (2)" in text
    # b has the lowest loss but is not causal at evaluation: c wins among the comparable ones
    assert "causal at evaluation (the router alone, dropless): c (2.800" in text
    assert "not causal at evaluation): b" in text
    assert "not in training (the training loss reads later tokens): c" in text
    assert "dispatch's drops: 1 of 2" in text
    assert "highest training throughput: b (1,000 tokens/s); lowest: a (500 tokens/s)" in text


def test_takeaways_name_every_router_of_a_tie():
    rows = [_row("a", 0.0, 0.0, 3.0), _row("b", 0.7, 0.2, 2.9), _row("c", 0.0, 0.0, 3.1)]
    text = "\n".join(router_takeaways(rows))
    assert "lowest MaxVio after training: a, c (0.000); highest: b (0.700)" in text
    assert "highest training throughput: a, b, c (1,000 tokens/s)" in text
