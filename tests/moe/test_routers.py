"""Each router's defining properties."""

from __future__ import annotations

import pytest
import torch

from workbench.config import MoEConfig
from workbench.moe import ROUTERS, build_router

# expert_choice and soft_moe warn that they are not causal; test_router_zoo.py checks the warning
pytestmark = pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")


def make(name: str, d_model: int = 16, **kw):
    return build_router(d_model, MoEConfig(router=name, **kw))


def call(router, x):
    """The hash router needs token ids; every other router ignores them."""
    return router(x, torch.arange(x.shape[0]) % 256)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_contract_shapes_dtypes_and_distinct_experts(name):
    top_k = 1 if name == "switch" else 3
    router = make(name, num_experts=8, top_k=top_k)
    x = torch.randn(50, 16)
    out = call(router, x)
    # expert choice pads K to the most experts any token got; the others give exactly top_k
    K = out.expert_ids_TK.shape[1] if name == "expert_choice" else top_k
    assert out.expert_ids_TK.shape == (50, K) and out.expert_ids_TK.dtype == torch.long
    assert out.weights_TK.shape == (50, K) and out.weights_TK.dtype == torch.float32
    assert out.scores_TE.shape == out.logits_TE.shape == (50, 8)
    mask = torch.ones(50, K, dtype=torch.bool) if out.mask_TK is None else out.mask_TK
    assert mask.dtype == torch.bool and mask.shape == (50, K)
    assert (out.weights_TK[mask] > 0).all() and (out.weights_TK[~mask] == 0).all()
    assert ((0 <= out.expert_ids_TK) & (out.expert_ids_TK < 8)).all()
    # no token picks the same expert twice
    assert (out.expert_ids_TK.sort(dim=1).values.diff(dim=1) != 0).all()


@pytest.mark.parametrize("name", list(ROUTERS))
def test_routing_maths_stays_fp32_under_bf16_autocast(name):
    router = make(name, num_experts=8, top_k=1 if name == "switch" else 2)
    x = torch.randn(20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(router, x.bfloat16())
    for t in (out.weights_TK, out.scores_TE, out.logits_TE):
        assert t.dtype == torch.float32
    # the router's input projection is the fp32 product of the bf16 input with the fp32 weight
    with torch.autocast("cpu", enabled=False):
        expected = router.gate_logits(x.bfloat16().float())
    if name in ("softmax_topk", "switch", "noisy_topk", "sigmoid"):
        torch.testing.assert_close(expected, x.bfloat16().float() @ router.weight.t())
    if name == "soft_moe":
        expected = expected.view(20, 8, -1).logsumexp(-1)
    torch.testing.assert_close(out.logits_TE, expected)


def test_softmax_topk_picks_the_highest_probabilities_and_renormalises():
    router = make("softmax_topk", num_experts=6, top_k=2, normalize_topk=True)
    out = router(torch.randn(40, 16))
    probs = out.logits_TE.softmax(-1)
    torch.testing.assert_close(out.scores_TE, probs)
    top2 = probs.topk(2, dim=-1)
    assert torch.equal(out.expert_ids_TK.sort(1).values, top2.indices.sort(1).values)
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(40))
    # renormalised weights are a softmax over the selected logits
    torch.testing.assert_close(out.weights_TK, out.logits_TE.gather(1, out.expert_ids_TK).softmax(-1))


def test_softmax_topk_without_renormalising_returns_raw_probabilities():
    router = make("softmax_topk", num_experts=6, top_k=2, normalize_topk=False)
    out = router(torch.randn(40, 16))
    torch.testing.assert_close(out.weights_TK, out.scores_TE.gather(1, out.expert_ids_TK))
    assert (out.weights_TK.sum(-1) < 1).all()


def test_switch_is_top1_with_the_max_probability_and_jitters_only_in_training():
    router = make("switch", num_experts=4, top_k=1, router_jitter=0.1)
    x = torch.randn(30, 16)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.logits_TE, b.logits_TE)
    torch.testing.assert_close(a.weights_TK.squeeze(1), a.scores_TE.max(-1).values)
    router.train()
    assert not torch.equal(router(x).logits_TE, a.logits_TE)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(router="switch", top_k=2)


def test_noisy_topk_is_clean_in_eval_noisy_in_training_and_learns_its_noise():
    router = make("noisy_topk", num_experts=8, top_k=2)
    x = torch.randn(200, 16)
    router.eval()
    clean = router(x)
    assert torch.equal(clean.expert_ids_TK.sort(1).values, clean.logits_TE.topk(2).indices.sort(1).values)
    torch.testing.assert_close(clean.weights_TK.sum(-1), torch.ones(200))
    router.train()
    noisy = router(x)
    changed = (noisy.expert_ids_TK.sort(1).values != clean.expert_ids_TK.sort(1).values).any(1)
    assert changed.float().mean() > 0.05  # softplus(0) = 0.69 std noise reroutes some tokens
    noisy.weights_TK.pow(2).sum().backward()
    assert router.noise_weight.grad.abs().sum() > 0


def test_sigmoid_bias_changes_selection_but_not_gate_values():
    router = make("sigmoid", num_experts=8, top_k=2, route_scale=2.5, bias_update_rate=1e-3)
    x = torch.randn(64, 16)
    before = router(x)
    router.bias[5] = 10.0  # expert 5 now wins every selection
    after = router(x)
    torch.testing.assert_close(after.scores_TE, before.scores_TE)  # scores ignore the bias
    assert (after.expert_ids_TK == 5).any(dim=1).all()
    assert not torch.equal(after.expert_ids_TK.sort(1).values, before.expert_ids_TK.sort(1).values)
    # gates: route_scale * s_i / sum of the selected (unbiased) s
    s = torch.sigmoid(after.logits_TE).gather(1, after.expert_ids_TK)
    torch.testing.assert_close(after.weights_TK, 2.5 * s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(after.weights_TK.sum(-1), torch.full((64,), 2.5))


def test_selection_bias_is_a_buffer_without_gradient_present_only_with_loss_free_balancing():
    router = make("sigmoid", num_experts=4, top_k=2, bias_update_rate=1e-3)
    assert "bias" in router.state_dict() and "bias" not in dict(router.named_parameters())
    plain = make("sigmoid", num_experts=4, top_k=2)
    assert plain.bias is None and "bias" not in plain.state_dict()


def test_group_limited_routing_never_selects_outside_the_kept_groups():
    E, G, kept = 16, 4, 2
    router = make("sigmoid", num_experts=E, top_k=4, num_groups=G, topk_groups=kept, bias_update_rate=1e-3)
    router.bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(300, 16)
    out = router(x)
    biased = out.scores_TE + router.bias
    # group score: the sum of the group's two largest biased affinities (DeepSeek-V3)
    group_scores = biased.view(300, G, E // G).topk(2, dim=-1).values.sum(-1)
    kept_groups = group_scores.topk(kept, dim=-1).indices
    chosen_groups = out.expert_ids_TK // (E // G)
    for t in range(300):
        assert set(chosen_groups[t].tolist()) <= set(kept_groups[t].tolist())
    # and inside the kept groups, selection is plain top-k of the biased affinities
    mask = torch.zeros(300, G, dtype=torch.bool).scatter_(1, kept_groups, True).repeat_interleave(E // G, 1)
    expected = biased.masked_fill(~mask, float("-inf")).topk(4).indices
    assert torch.equal(out.expert_ids_TK.sort(1).values, expected.sort(1).values)
    # and the restriction matters: without groups some tokens would pick elsewhere
    free = biased.topk(4).indices // (E // G)
    outside = [not set(free[t].tolist()) <= set(kept_groups[t].tolist()) for t in range(300)]
    assert any(outside)


def test_unknown_router_lists_the_known_ones():
    with pytest.raises(ValueError, match="router='nope'.*softmax_topk.*switch.*noisy_topk.*sigmoid"):
        MoEConfig(router="nope")
