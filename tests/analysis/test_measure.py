"""One fixed batch through one model: configs, routing counts, balance, reproducibility."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from workbench.analysis import analyze_router, build_model, fixed_batch, real_gates, route_batch, router_config
from workbench.analysis.measure import BALANCE_KEYS
from workbench.moe import ROUTERS, CausalLeakWarning
from workbench.moe.dispatch import expert_capacity


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_routes_the_batch_and_counts_every_assignment(router, tokens, micro):
    result = analyze_router(router, tokens, num_experts=4, top_k=2, base=micro)
    T = tokens.numel()
    assert result.layers == micro.moe_layers and len(result.metrics) == len(micro.moe_layers)
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
        assert m["mean_gate"] == pytest.approx(result.gates(layer).mean().item())
        for key in ("max_vio", "cv", "entropy", "router_confidence", "mean_gate"):
            assert math.isfinite(m[key]), key


def test_balance_averages_the_layers_and_sums_unused_experts(tokens, micro):
    result = analyze_router("softmax_topk", tokens, num_experts=4, top_k=2, base=micro)
    result.metrics[0].update(max_vio=0.5, unused_experts=1, dropped_fraction=0.25)
    result.metrics[1].update(max_vio=1.5, unused_experts=2, dropped_fraction=0.0)
    b = result.balance()
    assert b["max_vio"] == 1.0 and b["unused_experts"] == 3.0 and b["dropped_fraction"] == 0.125
    assert set(BALANCE_KEYS) <= set(b)


def test_real_gates_leave_out_padding_slots(tokens, micro):
    result = analyze_router("expert_choice", tokens, num_experts=4, top_k=2, base=micro)
    info = result.layer_info(result.layers[0])
    mask = info.router_output.mask_TK
    assert mask is not None and not mask.all()  # some tokens got fewer than K experts
    assert torch.equal(real_gates(info), info.router_output.weights_TK[mask].float())


def test_capacity_is_the_stated_factor(tokens, micro):
    result = analyze_router("softmax_topk", tokens, num_experts=4, top_k=2, capacity_factor=1.0, base=micro)
    assert result.metrics[0]["capacity"] == expert_capacity(tokens.numel(), 2, 4, 1.0)
    dropless = analyze_router("softmax_topk", tokens, num_experts=4, top_k=2, capacity_factor=None, base=micro)
    assert dropless.metrics[0]["capacity"] is None and dropless.balance()["dropped_fraction"] == 0


def test_uniform_router_is_exactly_balanced(tokens, micro):
    result = analyze_router("uniform", tokens, num_experts=4, top_k=2, base=micro)
    b = result.balance()
    assert b["max_vio"] == 0 and b["cv"] == 0 and b["unused_experts"] == 0 and b["dropped_fraction"] == 0
    assert b["entropy"] == pytest.approx(1.0)


def test_expert_choice_gives_every_expert_the_same_tokens(tokens, micro):
    result = analyze_router("expert_choice", tokens, num_experts=4, top_k=2, base=micro)
    for layer in result.layers:
        info = result.layer_info(layer)
        loads = info.tokens_per_expert
        assert (loads == loads[0]).all()
        assert result.layer_metrics(layer)["dropped_fraction"] == 0
        # padding slots are not gates: every real gate is a positive probability
        assert (result.gates(layer) > 0).all()


def test_an_unknown_layer_is_refused_with_the_moe_layers(tokens, micro):
    result = analyze_router("softmax_topk", tokens, num_experts=4, top_k=2, base=micro)
    with pytest.raises(ValueError, match=r"layer=7 is invalid: the MoE layers are \[0, 1\]"):
        result.layer_info(7)


def test_fixed_top_k_and_top_k_adjustments_are_notes(micro):
    cfg, notes = router_config("switch", num_experts=4, top_k=2, base=micro)
    assert cfg.moe.top_k == ROUTERS["switch"].fixed_top_k == 1
    assert notes == ["switch routes every token to 1 expert: top_k=1 (asked for 2)"]
    cfg, notes = router_config("softmax_topk", num_experts=4, top_k=6, base=micro)
    assert cfg.moe.top_k == 4 and notes == ["top_k=6 is more than num_experts=4: top_k=4"]
    cfg, notes = router_config("softmax_topk", num_experts=4, top_k=2, capacity_factor=1.5, base=micro)
    assert (cfg.moe.dispatch, cfg.moe.capacity_factor, notes) == ("capacity", 1.5, [])
    cfg, _ = router_config("softmax_topk", num_experts=4, top_k=2, capacity_factor=None, base=micro)
    assert cfg.moe.dispatch == micro.moe.dispatch
    with pytest.raises(ValueError, match="router='no_such_router' is invalid: allowed values are softmax_topk"):
        router_config("no_such_router")


@pytest.mark.parametrize("router", ["expert_choice", "soft_moe"])
def test_causal_leak_warnings_become_notes(router, tokens, micro):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze_router(router, tokens, num_experts=4, top_k=2, base=micro)
    assert not [w for w in caught if issubclass(w.category, CausalLeakWarning)]
    assert any("not causal" in n for n in result.notes)


def test_build_model_initialises_as_the_trainer_does_and_leaves_the_generator_alone(micro):
    cfg, _ = router_config("softmax_topk", num_experts=4, top_k=2, base=micro)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model, notes = build_model(cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before) and notes == []
    torch.manual_seed(3)  # what Trainer does before building the model
    from workbench.model import MoELM

    reference = MoELM(cfg)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_measurement_is_reproducible_and_leaves_the_generator_alone(tokens, micro):
    cfg, _ = router_config("random", num_experts=4, top_k=2, base=micro)
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


def test_fixed_batch_takes_windows_from_every_domain(micro_data):
    batch = fixed_batch(micro_data, sequences_per_domain=2)
    assert batch.tokens.shape == (4, 32)
    assert batch.domains[:, 0].tolist() == [0, 0, 1, 1]
    firsts = {d: b[0] for d, b in micro_data.val_batches(batch_size=2).items()}
    assert torch.equal(batch.tokens, torch.cat([firsts["words"].tokens, firsts["numbers"].tokens]))
    assert torch.equal(fixed_batch(micro_data, 2).tokens, batch.tokens)
    with pytest.raises(ValueError, match="sequences_per_domain=0"):
        fixed_batch(micro_data, 0)
