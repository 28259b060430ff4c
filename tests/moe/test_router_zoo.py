"""The router zoo: each router's defining property, its warnings, and its config fields."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.config import ModelConfig, MoEConfig, dense_baseline, tiny
from workbench.model import MoELM
from workbench.moe import ROUTERS, MoELayer, build_router, load_metrics
from workbench.moe.dispatch import soft_mixing_weights
from workbench.moe.routers import CausalLeakWarning, sinkhorn_log

# Routers that warn are built many times here; the warning itself is tested once per router.
pytestmark = pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")


def make(name: str, d_model: int = 16, **kw):
    return build_router(d_model, MoEConfig(router=name, **kw))


def skewed(router, boost: float = 0.1):
    """Make experts 0 and 1 everyone's favourites for all-positive inputs (as in test_balance)."""
    with torch.no_grad():
        router.weight[:2] += boost
    return router


# --- expert choice ----------------------------------------------------------------------


def test_expert_choice_gives_every_expert_exactly_C_tokens_its_top_C():
    router = make("expert_choice", num_experts=8, top_k=2)
    out = router(torch.randn(100, 16))
    C = math.ceil(2 * 100 / 8)  # c = top_k by default
    assert router.capacity(100) == C == 25
    ids, mask = out.expert_ids_TK, out.mask_TK
    assert torch.bincount(ids[mask], minlength=8).tolist() == [C] * 8
    for e in range(8):
        chosen = set((ids == e).logical_and(mask).any(dim=1).nonzero().squeeze(1).tolist())
        assert chosen == set(out.scores_TE[:, e].topk(C).indices.tolist())
    # K is the most experts any token got; tokens get a variable number of experts
    per_token = mask.sum(dim=1)
    assert ids.shape[1] == per_token.max() and per_token.min() < per_token.max()
    # gates are the (not renormalised) affinities, zero on padding
    torch.testing.assert_close(out.weights_TK, out.scores_TE.gather(1, ids) * mask)
    torch.testing.assert_close(out.scores_TE, out.logits_TE.softmax(-1))


def test_expert_choice_capacity_is_the_papers_c():
    router = make("expert_choice", num_experts=8, top_k=2, expert_choice_capacity=1.0)
    assert router.capacity(100) == math.ceil(100 / 8)
    assert router.capacity(3) == 1  # at least one token per expert
    full = make("expert_choice", num_experts=4, top_k=1, expert_choice_capacity=4.0)
    out = full(torch.randn(10, 16))
    assert full.capacity(10) == 10 and out.mask_TK.all()  # every expert takes every token


def test_expert_choice_can_evaluate_with_token_choice():
    router = make("expert_choice", num_experts=8, top_k=2, expert_choice_eval="token_choice")
    x = torch.randn(40, 16)
    assert router(x).mask_TK is not None  # training: expert choice
    router.eval()
    out = router(x)
    assert out.mask_TK is None
    assert torch.equal(out.expert_ids_TK.sort(1).values, out.scores_TE.topk(2).indices.sort(1).values)
    torch.testing.assert_close(out.weights_TK, out.scores_TE.gather(1, out.expert_ids_TK))
    default = make("expert_choice", num_experts=8, top_k=2).eval()
    assert default(x).mask_TK is not None  # by default evaluation routes as training does


@pytest.mark.filterwarnings("default::workbench.moe.routers.CausalLeakWarning")
@pytest.mark.parametrize("name, option", [("expert_choice", "expert_choice_eval='token_choice'"),
                                          ("soft_moe", "token-choice router")])
def test_non_causal_routers_warn_with_the_options(name, option):
    with pytest.warns(CausalLeakWarning, match=rf"router='{name}' is not causal") as record:
        make(name)
    message = str(record[0].message)
    for part in ("training loss is optimistic", "research on balance", option, "non-causal"):
        assert part in message


def _earliest_change(model: MoELM, split: int) -> tuple[float, float]:
    """Max change of the logits before / after position ``split`` when tokens from ``split`` on change."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 64), generator=gen)
    changed = tokens.clone()
    changed[:, split:] = torch.randint(0, 256, (2, 64 - split), generator=gen)
    a, b = model(tokens).logits, model(changed).logits
    return (a[:, :split] - b[:, :split]).abs().max().item(), (a[:, split:] - b[:, split:]).abs().max().item()


@pytest.mark.parametrize("name", ["expert_choice", "soft_moe"])
def test_non_causal_routers_leak_the_future_in_the_causal_lm(name):
    """Change the tokens from position 40 on: with a causal model the logits before 40 cannot
    change (tests/test_model.py checks that); with these routers they do."""
    torch.manual_seed(0)
    before, after = _earliest_change(MoELM(tiny(router=name)).eval(), 40)
    assert after > 1e-3
    assert before > 1e-4, "an earlier token's output should depend on later tokens"


def test_expert_choice_evaluated_with_token_choice_is_causal():
    torch.manual_seed(0)
    model = MoELM(tiny(router="expert_choice", expert_choice_eval="token_choice")).eval()
    before, after = _earliest_change(model, 40)
    assert before <= 1e-5 and after > 1e-3


def test_expert_choice_balance_loss_is_one_with_no_gradient():
    layer = MoELayer(16, MoEConfig(router="expert_choice", num_experts=4, top_k=2, expert_hidden=8))
    _, info = layer(torch.randn(2, 10, 16))
    assert info.losses["aux_loss"].item() == pytest.approx(1.0)
    assert info.tokens_per_expert.tolist() == [10] * 4  # C = ceil(2 * 20 / 4)
    info.losses["aux_loss"].backward()
    assert layer.router.weight.grad.abs().max() < 1e-6


# --- hash ---------------------------------------------------------------------------------


def test_hash_is_deterministic_per_token_id():
    router = make("hash", num_experts=8, top_k=2)
    token_ids = torch.randint(0, 256, (500,))
    a = router(torch.randn(500, 16), token_ids)
    b = router(torch.randn(500, 16) * 5, token_ids)  # other hidden states, same ids
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.expert_ids_TK, router.expert_table[token_ids])
    for v in token_ids.unique():
        rows = a.expert_ids_TK[token_ids == v]
        assert (rows == rows[0]).all()
    # a random map uses every expert
    assert (torch.bincount(router.expert_table.flatten(), minlength=8) > 0).all()
    # the map is a buffer: a checkpoint carries it, and a router built with another seed
    # routes identically once it is loaded
    assert "expert_table" in router.state_dict()
    torch.manual_seed(123)
    other = make("hash", num_experts=8, top_k=2)
    assert not torch.equal(other.expert_table, router.expert_table)
    other.load_state_dict(router.state_dict())
    assert torch.equal(other(torch.randn(500, 16), token_ids).expert_ids_TK, a.expert_ids_TK)


def test_hash_needs_token_ids_inside_the_table():
    router = make("hash", num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(3, 16))
    layer = MoELayer(16, MoEConfig(router="hash", num_experts=4, top_k=1, expert_hidden=8))
    with pytest.raises(ValueError, match="token_ids_BS"):
        layer(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="hash_vocab_size=256"):
        router(torch.randn(2, 16), torch.tensor([3, 300]))
    big = make("hash", num_experts=4, top_k=1, hash_vocab_size=1000)
    assert big(torch.randn(2, 16), torch.tensor([3, 300])).expert_ids_TK.shape == (2, 1)


def test_hash_gates_are_one_for_top1_and_learned_for_topk():
    top1 = make("hash", num_experts=8, top_k=1)
    assert (top1(torch.randn(20, 16), torch.arange(20)).weights_TK == 1).all()  # the paper: no gate
    top2 = make("hash", num_experts=8, top_k=2)
    out = top2(torch.randn(20, 16), torch.arange(20))
    torch.testing.assert_close(out.weights_TK, out.logits_TE.gather(1, out.expert_ids_TK).softmax(-1))
    out.weights_TK[:, 0].sum().backward()
    assert top2.weight.grad.abs().sum() > 0


# --- sinkhorn -----------------------------------------------------------------------------


def test_sinkhorn_log_balances_tokens_and_experts():
    logits = torch.randn(64, 4) * 3
    a = sinkhorn_log(logits, 100).exp()
    torch.testing.assert_close(a.sum(dim=0), torch.full((4,), 16.0))  # each expert T / E
    torch.testing.assert_close(a.sum(dim=1), torch.ones(64), atol=1e-3, rtol=0)  # each token 1
    # only per-token and per-expert factors change: log A - logits is a sum u_t + v_e
    delta = a.log() - logits
    torch.testing.assert_close(delta - delta[:, :1] - delta[:1, :] + delta[0, 0], torch.zeros(64, 4),
                               atol=1e-4, rtol=0)


def test_sinkhorn_load_is_near_uniform_where_top_k_collapses():
    torch.manual_seed(0)
    sinkhorn = skewed(make("sinkhorn", num_experts=8, top_k=2))
    topk = make("softmax_topk", num_experts=8, top_k=2)
    topk.load_state_dict(sinkhorn.state_dict(), strict=False)
    x = torch.randn(2048, 16).abs()
    load = lambda out: load_metrics(torch.bincount(out.expert_ids_TK.flatten(), minlength=8))  # noqa: E731
    balanced, collapsed = sinkhorn(x), topk(x)
    assert load(collapsed)["max_vio"] > 2.0
    assert load(balanced)["max_vio"] < 0.2
    # gates come from the unbalanced softmax, renormalised over the selected experts
    probs = balanced.logits_TE.softmax(-1)
    torch.testing.assert_close(balanced.scores_TE, probs)
    sel = probs.gather(1, balanced.expert_ids_TK)
    torch.testing.assert_close(balanced.weights_TK, sel / sel.sum(-1, keepdim=True))
    # evaluation routes causally: plain top-k, which here is as skewed as softmax_topk
    sinkhorn.eval()
    assert torch.equal(sinkhorn(x).expert_ids_TK.sort(1).values, collapsed.expert_ids_TK.sort(1).values)


def test_sinkhorn_selection_sees_the_batch_in_training_only():
    """Documented: the balancing offsets depend on every token of the batch, so training routing
    is not causal (selection only); evaluation is plain top-k, which is."""
    torch.manual_seed(0)
    model = MoELM(tiny(router="sinkhorn"))
    assert _earliest_change(model.train(), 40)[0] > 1e-4
    assert _earliest_change(model.eval(), 40)[0] <= 1e-5


# --- soft MoE -----------------------------------------------------------------------------


def test_soft_moe_dispatch_and_combine_weights_sum_to_one():
    B, S, E, slots = 3, 10, 4, 3
    router = make("soft_moe", num_experts=E, top_k=2, soft_slots_per_expert=slots)
    out = router(torch.randn(B * S, 16))
    logits = out.slot_logits_TL.view(B, S, E * slots)
    dispatch, combine = soft_mixing_weights(logits)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(B, E * slots))  # over tokens, per slot
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(B, S))  # over slots, per token
    # padding takes no dispatch weight, and the real tokens' weights still sum to one
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, 6:] = False
    pad[2] = False  # a sequence of padding only must not divide by zero
    dispatch, _ = soft_mixing_weights(logits, pad)
    assert dispatch[0, 6:].abs().max() == 0 and torch.isfinite(dispatch).all()
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(B, E * slots))
    # the common fields: per-expert combine mass, its top_k, and the logsumexp logits
    mass = combine.reshape(B * S, E, slots).sum(-1)
    torch.testing.assert_close(out.scores_TE, mass)
    torch.testing.assert_close(out.logits_TE, out.slot_logits_TL.view(B * S, E, slots).logsumexp(-1))
    top = mass.topk(2)
    assert torch.equal(out.expert_ids_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, top.values)


def test_soft_moe_layer_computes_the_papers_equations_per_sequence():
    B, S, D, E, slots = 2, 7, 16, 3, 2
    cfg = MoEConfig(router="soft_moe", num_experts=E, top_k=1, expert_hidden=24, soft_slots_per_expert=slots)
    layer = MoELayer(D, cfg)
    layer.experts.reset_parameters(std=0.25, out_std=0.2)
    x = torch.randn(B, S, D)
    y, info = layer(x)
    phi = layer.router.weight.t()  # (D, E * slots)
    for b in range(B):
        logits = x[b] @ phi  # (S, E * slots)
        slots_in = logits.softmax(dim=0).t() @ x[b]  # D^T X
        slots_out = torch.stack([layer.experts.forward_one(n // slots, slots_in[n]) for n in range(E * slots)])
        torch.testing.assert_close(y[b], logits.softmax(dim=1) @ slots_out, atol=1e-5, rtol=0)
    assert info.stats.dropped_assignments.item() == 0
    assert info.tokens_per_expert.sum().item() == B * S  # attribution: one (top_k=1) expert per token
    # gradients reach Phi, the experts and the input
    x.requires_grad_()
    layer(x)[0].sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts.w2.grad.abs().sum() > 0


def test_soft_moe_mixes_within_a_sequence_and_leaves_padding_out():
    layer = MoELayer(16, MoEConfig(router="soft_moe", num_experts=4, top_k=2, expert_hidden=8))
    x = torch.randn(2, 12, 16)
    y, _ = layer(x)
    other = x.clone()
    other[1] = torch.randn(12, 16)
    torch.testing.assert_close(layer(other)[0][0], y[0])  # sequence 0 never sees sequence 1
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[:, 9:] = False
    y_pad, _ = layer(x, padding_mask_BS=pad)
    torch.testing.assert_close(y_pad[:, :9], layer(x[:, :9])[0])  # as if the padding were not there


# --- cosine -------------------------------------------------------------------------------


def test_cosine_logits_are_cosines_over_a_clamped_learned_temperature():
    router = make("cosine", num_experts=8, top_k=2, cosine_dim=4)
    x = torch.randn(30, 16)
    out = router(x)
    cos = F.normalize(x @ router.weight.t(), dim=-1) @ F.normalize(router.expert_embed, dim=-1).t()
    torch.testing.assert_close(out.logits_TE, cos / 0.5)  # tau starts at 0.5
    torch.testing.assert_close(router(3 * x).logits_TE, out.logits_TE)  # invariant to the input's scale
    # top-k of the softmax, gates renormalised as softmax_topk does
    assert torch.equal(out.expert_ids_TK.sort(1).values, out.scores_TE.topk(2).indices.sort(1).values)
    torch.testing.assert_close(out.weights_TK, out.logits_TE.gather(1, out.expert_ids_TK).softmax(-1))
    out.weights_TK[:, 0].sum().backward()
    for p in (router.weight, router.expert_embed, router.log_inv_temperature):
        assert p.grad.abs().sum() > 0
    # the clamp: 1 / tau never exceeds 100, and past it the temperature stops learning
    with torch.no_grad():
        router.log_inv_temperature.fill_(10.0)
    router.zero_grad()
    out = router(x)
    torch.testing.assert_close(out.logits_TE, cos * 100)
    out.weights_TK[:, 0].sum().backward()
    assert router.log_inv_temperature.grad.item() == 0


def test_cosine_takes_the_loss_free_bias():
    cfg = MoEConfig(router="cosine", num_experts=4, top_k=1, bias_update_rate=0.01)
    router = build_router(16, cfg)
    router.bias[2] = 10.0
    assert (router(torch.randn(10, 16)).expert_ids_TK == 2).all()


# --- uniform and random -------------------------------------------------------------------


def test_uniform_is_exactly_balanced():
    router = make("uniform", num_experts=8, top_k=2)
    out = router(torch.randn(100, 16))  # T K = 200 = 25 E
    assert torch.bincount(out.expert_ids_TK.flatten(), minlength=8).tolist() == [25] * 8
    counts = torch.bincount(router(torch.randn(101, 16)).expert_ids_TK.flatten(), minlength=8)
    assert counts.max() - counts.min() <= 1  # not a multiple of E: within one
    # the linear gate still runs and learns: renormalised probabilities of the forced experts
    sel = out.scores_TE.gather(1, out.expert_ids_TK)
    torch.testing.assert_close(out.weights_TK, sel / sel.sum(-1, keepdim=True))
    out.weights_TK[:, 0].sum().backward()
    assert router.weight.grad.abs().sum() > 0
    # through the layer, whatever the input: every load metric says perfectly balanced
    layer = MoELayer(16, MoEConfig(router="uniform", num_experts=8, top_k=2, expert_hidden=8))
    _, info = layer(skewed(make("uniform")).weight.new_ones(4, 50, 16))
    m = load_metrics(info.tokens_per_expert)
    assert m["cv"] == 0 and m["max_vio"] == 0


def test_random_draws_fresh_uniform_experts_every_forward():
    router = make("random", num_experts=8, top_k=3)
    x = torch.randn(4000, 16)
    a, b = router(x), router(x)
    assert not torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert (a.expert_ids_TK.sort(1).values.diff(1) != 0).all()
    assert load_metrics(torch.bincount(a.expert_ids_TK.flatten(), minlength=8))["max_vio"] < 0.1
    # independent of the router's preferences
    assert load_metrics(torch.bincount(skewed(router, 1.0)(x.abs()).expert_ids_TK.flatten()))["max_vio"] < 0.1
    sel = a.scores_TE.gather(1, a.expert_ids_TK)
    torch.testing.assert_close(a.weights_TK, sel / sel.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_router_runs_the_layer_under_bf16_autocast(name):
    cfg = MoEConfig(router=name, num_experts=4, top_k=1, expert_hidden=32)
    layer = MoELayer(32, cfg)
    x, token_ids = torch.randn(2, 8, 32), torch.randint(0, 256, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = layer(x.bfloat16(), token_ids)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    for t in (info.router_output.weights_TK, info.router_output.scores_TE, info.router_output.logits_TE):
        assert t.dtype == torch.float32
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    ({"expert_choice_capacity": 0.0}, r"expert_choice_capacity=0.0 .*None or in \(0, num_experts=8\]"),
    ({"expert_choice_capacity": 9.0}, r"expert_choice_capacity=9.0 .*num_experts=8"),
    ({"expert_choice_eval": "greedy"}, r"expert_choice_eval='greedy' .*expert_choice, token_choice"),
    ({"hash_vocab_size": 0}, r"hash_vocab_size=0 .*>= 1"),
    ({"sinkhorn_iters": 0}, r"sinkhorn_iters=0 .*>= 1"),
    ({"soft_slots_per_expert": 0}, r"soft_slots_per_expert=0 .*>= 1"),
    ({"cosine_dim": 0}, r"cosine_dim=0 .*>= 1"),
    ({"router": "uniform", "bias_update_rate": 0.01}, r"router='uniform' .*selection bias: .*cosine"),
    ({"router": "hash", "bias_update_rate": 0.01}, r"router='hash' .*selection bias"),
])
def test_invalid_zoo_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**kwargs)


def test_unknown_router_lists_every_router():
    with pytest.raises(ValueError) as err:
        MoEConfig(router="nope")
    for name in ROUTERS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_params_match_the_module(name):
    cfg = MoEConfig(router=name, num_experts=6, top_k=1, cosine_dim=5, soft_slots_per_expert=3)
    assert cfg.router_params(24) == sum(p.numel() for p in build_router(24, cfg).parameters())


def test_dense_baseline_has_the_active_expert_parameters_and_flops():
    for cfg in (tiny(), tiny(num_shared_experts=1, shared_expert_gate=True)):
        dense = dense_baseline(cfg)
        m = cfg.moe
        assert dense.moe is None and dense.dense_hidden == m.top_k * m.expert_hidden + m.shared_hidden
        # what differs is exactly the router and the shared-expert gate
        unmatched = len(cfg.moe_layers) * (m.router_params(cfg.d_model) + (cfg.d_model if m.shared_expert_gate else 0))
        assert cfg.num_active_params() - dense.num_active_params() == unmatched
        assert cfg.flops_per_token() - dense.flops_per_token() == 6 * unmatched
        assert dense.num_params() == sum(p.numel() for p in MoELM(dense).parameters())
    assert dense_baseline(tiny(router="expert_choice", expert_choice_capacity=3.0)).dense_hidden == 3 * 128
    assert dense_baseline(tiny(router="soft_moe", soft_slots_per_expert=4)).dense_hidden == 8 * 4 * 128 // 128
    assert dense_baseline(dense_baseline(tiny())) == dense_baseline(tiny())
    mixed = ModelConfig(n_layers=4, first_dense_layers=1, dense_hidden=100,
                        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64))
    with pytest.raises(ValueError, match=r"dense_hidden=100 .*active width 128"):
        dense_baseline(mixed)
    assert dense_baseline(mixed.replace(dense_hidden=128)).dense_hidden == 128
