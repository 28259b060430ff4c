"""Per-sequence (causal) capacity: each sequence its own C slots per expert, claimed in token order.

Tolerances as in test_dispatch.py (max abs error): outputs 1e-5, gradients 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.moe.helpers import random_masked_routing, random_routing
from tests.moe.test_dispatch import GRAD_TOL, OUT_TOL, make_experts, run
from workbench.analysis import CAUSAL_TOLERANCE, build_model, dropless_copy, future_leak
from workbench.config import ModelConfig, MoEConfig
from workbench.moe import MoELayer, RouterOutput
from workbench.moe.dispatch import capacity_dispatch, expert_capacity, loop_dispatch

pytestmark = pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")


def per_sequence(x, routing, experts, B, S, factor, **kw):
    return capacity_dispatch(x, routing, experts, capacity_factor=factor, capacity_scope="sequence",
                             batch_shape=(B, S), **kw)


# --- equivalence with the loop reference when nothing drops -------------------------------


@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("factor", [None, "no_drop"])
def test_per_sequence_capacity_agrees_with_loop_reference_when_nothing_drops(E, K, factor, expert_kernel):
    B, S, D, H = 3, 20, 32, 64
    experts = expert_kernel.convert(make_experts(E, D, H))
    x = torch.randn(B * S, D)
    routing = random_routing(B * S, E, K, requires_grad=True)
    factor = E / K if factor == "no_drop" else None  # both give C = S: no expert can overflow
    y_ref, stats_ref, g_ref = run(loop_dispatch, x, routing, experts)
    assert y_ref.abs().max() > 0.1
    y, stats, g = run(capacity_dispatch, x, routing, experts, capacity_factor=factor, capacity_scope="sequence",
                      batch_shape=(B, S))
    assert stats.capacity == S
    assert (y - y_ref).abs().max() <= OUT_TOL
    for a, b, what in zip(g, g_ref, ["x", "weights", "w1", "w2", "w3"], strict=True):
        assert (a - b).abs().max() <= GRAD_TOL, f"gradient of {what}"
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    assert torch.equal(stats.kept_per_expert, stats_ref.tokens_per_expert)
    assert stats.dropped_assignments.item() == 0 and stats.dropped_tokens.item() == 0


def test_layer_with_per_sequence_capacity_agrees_with_loop_dispatch_end_to_end():
    """Through MoELayer (the (B, S) layout reaches the dispatch): output and every gradient."""
    results = {}
    for fields in ({"dispatch": "loop"}, {"dispatch": "capacity", "capacity_factor": None,
                                          "capacity_scope": "sequence"}):
        torch.manual_seed(3)
        layer = MoELayer(16, MoEConfig(num_experts=8, top_k=2, expert_hidden=32, num_shared_experts=1, **fields))
        layer.experts.reset_parameters(std=0.25, out_std=0.2)
        x = torch.randn(3, 10, 16, requires_grad=True)
        y, info = layer(x)
        loss = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum() + info.weighted_loss
        loss.backward()
        results[fields["dispatch"]] = (y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, info)
    y_ref, gx_ref, gp_ref, _ = results["loop"]
    y, gx, gp, info = results["capacity"]
    assert info.stats.capacity == 10 and info.stats.dropped_assignments.item() == 0
    assert (y - y_ref).abs().max() <= OUT_TOL
    assert (gx - gx_ref).abs().max() <= GRAD_TOL
    for n in gp_ref:
        assert (gp[n] - gp_ref[n]).abs().max() <= GRAD_TOL, n


# --- exact drops on a hand-built routing ----------------------------------------------------


def test_per_sequence_capacity_drops_exactly_in_token_order():
    """2 sequences of 4 tokens, 3 experts, top-2; C = ceil(0.75 * 4 * 2 / 3) = 2 per sequence.

    Sequence 0: t0 [0, 1], t1 [0, 2], t2 [1, 0], t3 [0, 2]
      expert 0 is claimed by t0, t1, t2, t3 in token order: t2's and t3's pairs are dropped;
      experts 1 (t0, t2) and 2 (t1, t3) have room.
    Sequence 1: t4 [2, 1], t5 [2, 1], t6 [2, 0], t7 [1, 2]
      expert 2: t4, t5 keep, t6 and t7 drop; expert 1: t4, t5 keep, t7 drops; expert 0: t6 keeps.
      t7 loses both pairs: a dropped token. (GShard's rounds, first choices before second ones,
      would give expert 1 to t7's first choice and drop t5's second: a later token would take
      an earlier one's slot.) Sequence 0's full expert 0 takes nothing from sequence 1.
    """
    experts = make_experts(3, 8, 16)
    x = torch.randn(8, 8)
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 2], [2, 1], [2, 1], [2, 0], [1, 2]])
    weights = torch.rand(8, 2, generator=torch.Generator().manual_seed(0)) + 0.1
    scores = torch.full((8, 3), 1 / 3)
    routing = RouterOutput(ids, weights, scores, scores.log())
    assert expert_capacity(4, 2, 3, 0.75) == 2
    y, stats = per_sequence(x, routing, experts, 2, 4, 0.75)

    dropped = {(2, 1), (3, 0), (6, 0), (7, 0), (7, 1)}  # (token, slot)
    expected = torch.zeros(8, 8)
    for t in range(8):
        for k in range(2):
            if (t, k) not in dropped:
                expected[t] += weights[t, k] * experts.forward_one(ids[t, k].item(), x[t])
    torch.testing.assert_close(y, expected.detach(), atol=OUT_TOL, rtol=0)
    assert y[7].abs().max() == 0
    assert stats.capacity == 2
    assert stats.tokens_per_expert.tolist() == [5, 5, 6]
    assert stats.kept_per_expert.tolist() == [3, 4, 4]
    assert stats.dropped_assignments.item() == 5
    assert stats.dropped_tokens.item() == 1


def test_sequences_do_not_share_slots():
    """Each sequence dispatched alone gives the same rows and, summed, the same counts."""
    B, S, E, K = 4, 16, 4, 2
    experts = make_experts(E, 16, 32)
    x = torch.randn(B * S, 16)
    routing = random_routing(B * S, E, K, generator=torch.Generator().manual_seed(5))
    y, stats = per_sequence(x, routing, experts, B, S, 0.5)
    assert stats.dropped_assignments > 0
    dropped, kept = 0, torch.zeros(E, dtype=torch.long)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        one = RouterOutput(routing.expert_ids_TK[rows], routing.weights_TK[rows], routing.scores_TE[rows],
                           routing.logits_TE[rows])
        y_b, stats_b = per_sequence(x[rows], one, experts, 1, S, 0.5)
        torch.testing.assert_close(y[rows], y_b, atol=OUT_TOL, rtol=0)
        dropped += stats_b.dropped_assignments.item()
        kept += stats_b.kept_per_expert
    assert stats.dropped_assignments.item() == dropped
    assert torch.equal(stats.kept_per_expert, kept)


def test_later_routing_never_changes_earlier_outputs_per_sequence_but_does_batch_wide():
    """Reroute the tokens from position 8 on: per sequence, the earlier outputs stay exactly;
    batch-wide with GShard rounds, a later token's first choice takes an earlier second choice's slot."""
    B, S, E, K, split = 2, 16, 4, 2, 8
    experts = make_experts(E, 16, 32)
    x = torch.randn(B * S, 16)
    routing = random_routing(B * S, E, K, generator=torch.Generator().manual_seed(0))
    ids = routing.expert_ids_TK.clone().view(B, S, K)
    ids[:, split:] = (ids[:, split:] + 1) % E  # every later token picks other experts (still distinct)
    altered = RouterOutput(ids.view(B * S, K), routing.weights_TK, routing.scores_TE, routing.logits_TE)
    early = (torch.arange(B * S) % S) < split

    y, stats = per_sequence(x, routing, experts, B, S, 0.5)
    y_alt, _ = per_sequence(x, altered, experts, B, S, 0.5)
    assert stats.dropped_assignments > 0
    assert torch.equal(y[early], y_alt[early])

    y, stats = capacity_dispatch(x, routing, experts, capacity_factor=0.5)
    y_alt, _ = capacity_dispatch(x, altered, experts, capacity_factor=0.5)
    assert (y[early] - y_alt[early]).abs().max() > 1e-3


def test_per_sequence_capacity_refuses_what_it_cannot_do_causally():
    experts = make_experts(4, 8, 16)
    x = torch.randn(12, 8)
    with pytest.raises(ValueError, match=r"^drop_policy='score' is invalid: capacity_scope='sequence'"):
        per_sequence(x, random_routing(12, 4, 2), experts, 2, 6, 1.0, drop_policy="score")
    with pytest.raises(ValueError, match=r"^capacity_scope='sequence' is invalid: .*masked routing"):
        per_sequence(x, random_masked_routing(12, 4, 2), experts, 2, 6, 1.0)
    with pytest.raises(ValueError, match=r"^capacity_scope='sequence' is invalid: .*batch_shape"):
        capacity_dispatch(x, random_routing(12, 4, 2), experts, capacity_scope="sequence")
    with pytest.raises(ValueError, match=r"^batch_shape=\(2, 5\) is invalid"):
        per_sequence(x, random_routing(12, 4, 2), experts, 2, 5, 1.0)
    with pytest.raises(ValueError, match=r"^capacity_scope='token' is invalid: allowed values are batch, sequence"):
        capacity_dispatch(x, random_routing(12, 4, 2), experts, capacity_scope="token")


# --- causality of the whole model, measured --------------------------------------------------

MICRO = dict(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=64)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_sequence_capacity_makes_a_dropping_model_causal(seed):
    """A low capacity factor drops many assignments in both scopes; only the batch-wide scope lets
    later tokens move earlier logits (measured: 3e-3 to 5e-3 here, against a tolerance of 1e-4)."""
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))
    leaks = {}
    for scope in ("batch", "sequence"):
        cfg = ModelConfig(**MICRO, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, dispatch="capacity",
                                                 capacity_factor=0.5, capacity_scope=scope))
        model = build_model(cfg, seed=0)[0].train()
        with torch.no_grad():
            routing = model(tokens).routing
        assert all(info.stats.dropped_assignments > 0 for info in routing), scope  # drops did happen
        leaks[scope] = future_leak(model, tokens, dropless=False, train_mode=True)
    assert leaks["batch"] > CAUSAL_TOLERANCE
    assert leaks["sequence"] <= CAUSAL_TOLERANCE


def test_the_dropless_copy_of_a_per_sequence_capacity_model_builds():
    """``future_leak``'s default probe swaps in the sorted dispatch; the scope must not block it."""
    cfg = ModelConfig(**MICRO, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, dispatch="capacity",
                                             capacity_factor=0.5, capacity_scope="sequence"))
    model = build_model(cfg, seed=0)[0]
    copy = dropless_copy(model)
    assert copy.cfg.moe.dispatch == "sorted" and copy.cfg.moe.capacity_scope == "batch"
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    assert future_leak(model, tokens) <= CAUSAL_TOLERANCE
