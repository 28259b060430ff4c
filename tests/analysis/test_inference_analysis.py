"""``workbench.analysis.inference``: temporal locality on hand-made routing, the inference-time
knobs (each changes what it should and restores the model bit for bit, kernels on and off), and
the determinism report."""

from __future__ import annotations

import math

import pytest
import torch

from tests.analysis.helpers import MICRO
from workbench.analysis import inference as inf
from workbench.inference import LayerRouting, generate
from workbench.kernels import cpu as cpu_kernels
from workbench.model import MoELM

# --- temporal locality -----------------------------------------------------------------------


def _routing(first: list[list[int]], second: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, K) ids with the first choice in slot 1 (gate 0.7), to check that the first choice
    comes from the gates and not from the slot order; -1 entries mark positions without a token."""
    ids = torch.tensor(first)[..., None]
    gates = torch.full(ids.shape, 0.7)
    if second is not None:
        ids = torch.cat([torch.tensor(second)[..., None], ids], dim=-1)
        gates = torch.cat([torch.full(gates.shape, 0.3), gates], dim=-1)
    return ids, gates


def test_top1_rate_and_chance_by_hand():
    ids, gates = _routing([[0, 0, 1, 1, 1, 2]])
    r = inf.repeat_rates(ids, gates, num_experts=4)["top1"]
    assert r["pairs"] == 5
    assert r["rate"] == pytest.approx(3 / 5)
    assert r["chance"] == pytest.approx((4 + 9 + 1) / 36)  # loads (2, 3, 1) / 6
    # within-sequence permutation, exactly: two distinct positions share an expert: (2*1 + 3*2) / (6*5)
    assert r["shuffled"] == pytest.approx(8 / 30)
    assert r["uniform"] == pytest.approx(1 / 4)


def test_chance_pools_the_load_and_the_permutation_is_per_sequence():
    # pooled loads (2, 2, 0, 2) / 6 -> 1/3; per sequence: [0,1,0,1] -> (2 + 2) / 12 over 3 pairs,
    # [3,3] -> 2 / 2 over 1 pair
    ids, gates = _routing([[0, 1, 0, 1], [3, 3, -1, -1]])
    r = inf.repeat_rates(ids, gates, num_experts=4)["top1"]
    assert r["pairs"] == 4
    assert r["rate"] == pytest.approx(1 / 4)  # only the pair of sequence 1 repeats
    assert r["chance"] == pytest.approx(1 / 3)
    assert r["shuffled"] == pytest.approx((3 * (4 / 12) + 1 * 1.0) / 4)


def test_exact_permutation_baseline_matches_sampled_shuffles():
    g = torch.Generator().manual_seed(2)
    first = torch.randint(0, 3, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.bool)
    exact = inf.permuted_top1_repeats(first, mask, 3) / (4 * 11)
    shuffle_g = torch.Generator().manual_seed(0)
    sampled = [inf._top1_repeats(inf.shuffle_within_sequences(first, mask, shuffle_g), inf._pairs(mask)) / 44
               for _ in range(3000)]
    assert sum(sampled) / len(sampled) == pytest.approx(exact, abs=0.005)


def test_first_choice_reads_the_gates_and_topk_overlap():
    # first choices 0,1,2 never repeat; the sets {0,5},{1,5},{2,6} overlap at the first pair only
    ids, gates = _routing([[0, 1, 2]], second=[[5, 5, 6]])
    assert inf.first_choice(ids, gates).tolist() == [[0, 1, 2]]
    rates = inf.repeat_rates(ids, gates, num_experts=8)
    assert rates["top1"]["rate"] == 0 and rates["topk"]["rate"] == pytest.approx(1 / 2)
    assert rates["topk"]["uniform"] == pytest.approx(1 - math.comb(6, 2) / math.comb(8, 2))  # Mixtral's 46%


def test_start_counts_generated_pairs_only():
    ids, gates = _routing([[0, 0, 0, 1, 1, 2]])
    r = inf.repeat_rates(ids, gates, num_experts=4, start_B=[3])["top1"]  # tokens 3, 4, 5: pairs (3,4), (4,5)
    assert r["pairs"] == 2 and r["rate"] == pytest.approx(1 / 2)
    assert r["chance"] == pytest.approx((4 + 1) / 9)
    assert r["shuffled"] == pytest.approx(2 / 6)


def test_permutation_preserves_every_sequences_load():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 8, (5, 40, 2), generator=g)
    mask = torch.rand(5, 40, generator=g) > 0.2
    shuffled = inf.shuffle_within_sequences(values, mask, torch.Generator().manual_seed(3))
    assert not torch.equal(shuffled, values)
    assert torch.equal(shuffled[~mask], values[~mask])  # positions not counted stay
    for b in range(5):
        for k in range(2):
            assert torch.equal(torch.bincount(shuffled[b, mask[b], k], minlength=8),
                               torch.bincount(values[b, mask[b], k], minlength=8))
        # rows move whole: a token's experts stay together
        assert sorted(map(tuple, shuffled[b, mask[b]].tolist())) == sorted(map(tuple, values[b, mask[b]].tolist()))


def test_shuffled_baseline_of_random_routing_matches_its_rate():
    """Routing drawn i.i.d. from a skewed load: rate, sum p^2 and the permutation baseline agree."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    first = torch.multinomial(p, 8 * 400, replacement=True, generator=g).view(8, 400)
    ids, gates = first[..., None], torch.ones(8, 400, 1)
    r = inf.repeat_rates(ids, gates, num_experts=4, shuffles=4)["top1"]
    assert r["rate"] == pytest.approx(0.30, abs=0.03)  # sum p^2 = 0.16 + 0.09 + 0.04 + 0.01
    assert r["chance"] == pytest.approx(0.30, abs=0.02) and r["shuffled"] == pytest.approx(r["chance"], abs=0.01)


def test_locality_table_rows():
    ids, gates = _routing([[0, 0, 1, 1, 1, 2]], second=[[1, 1, 0, 0, 2, 1]])
    layers = [LayerRouting(block, ids, gates, torch.zeros(1, 6, 4)) for block in (0, 2)]
    rows = inf.locality_table(layers, num_experts=4, shuffles=4)
    assert [(r["layer"], r["block"], r["metric"]) for r in rows] == [
        (0, 0, "top1"), (0, 0, "topk"), (1, 2, "top1"), (1, 2, "topk")]
    assert rows[0]["ratio"] == pytest.approx((3 / 5) / (14 / 36))
    assert rows[1]["rate"] == 1.0  # {0,1},{0,1},{0,1},... every consecutive pair shares an expert


# --- the model-level pieces --------------------------------------------------------------------


def _model(fused: bool, seed: int = 0, **moe) -> MoELM:
    cfg = MICRO if not moe else MICRO.replace(moe=MICRO.moe.__class__(**{**MICRO.moe.__dict__, **moe}))
    torch.manual_seed(seed)
    with cpu_kernels.fused_cpu_kernel(fused):
        return MoELM(cfg).eval()


KERNELS = pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_kernels.kernel_available(), reason="the fused CPU kernels cannot be built here"))],
    ids=["readable", "fused"])


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(_tokens())
    return state, out.logits.clone(), [r.router_output.expert_ids_TK.clone() for r in out.routing]


def _assert_restored(model, snapshot):
    state, logits, ids = snapshot
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    with torch.no_grad():
        out = model(_tokens())
    assert torch.equal(out.logits, logits)
    assert all(torch.equal(a.router_output.expert_ids_TK, b) for a, b in zip(out.routing, ids, strict=True))
    assert all(not layer.router._forward_hooks for layer in model.moe_layers())


@KERNELS
def test_teacher_forced_routing_matches_generation(fused):
    model = _model(fused)
    result = generate(model, ["ab", "hello"], 6)
    forced = inf.teacher_forced_routing(model, result.tokens)
    assert [r.block for r in forced] == [r.block for r in result.routing]
    assert forced[0].expert_ids[0, 8:].eq(-1).all()  # "ab" + 6 = 8 tokens; padded to "hello" + 6 = 11
    for row in inf.routing_agreement(result.routing, forced):
        assert row["set"] == 1.0 and row["top1"] == 1.0 and row["tokens"] == 8 + 11


@KERNELS
@pytest.mark.parametrize("renormalize", [True, False])
def test_smaller_top_k_routes_to_the_highest_ranked_and_restores(fused, renormalize):
    model = _model(fused)
    snapshot = _snapshot(model)
    with torch.no_grad():
        full = model(_tokens())
    with inf.smaller_top_k(model, 1, renormalize=renormalize), torch.no_grad():
        out = model(_tokens())
    assert all(info.router_output.expert_ids_TK.shape[1] == 1 for info in out.routing)
    # the first MoE layer sees the same input: its expert is the trained top-2's first choice
    ro, ref = out.routing[0].router_output, full.routing[0].router_output
    best = ref.weights_TK.argmax(-1, keepdim=True)
    assert torch.equal(ro.expert_ids_TK, ref.expert_ids_TK.gather(1, best))
    expected = torch.ones_like(ro.weights_TK) if renormalize else ref.weights_TK.gather(1, best)
    torch.testing.assert_close(ro.weights_TK, expected)
    assert not torch.equal(out.logits, full.logits)
    _assert_restored(model, snapshot)


@KERNELS
@pytest.mark.parametrize("renormalize", [True, False])
def test_smaller_top_k_at_the_trained_k_is_the_model(fused, renormalize):
    model = _model(fused)
    snapshot = _snapshot(model)
    with inf.smaller_top_k(model, MICRO.moe.top_k, renormalize=renormalize), torch.no_grad():
        out = model(_tokens())
    assert torch.equal(out.logits, snapshot[1])
    with pytest.raises(ValueError, match="k"):
        inf.smaller_top_k(model, MICRO.moe.top_k + 1)


@KERNELS
def test_dropped_experts_are_never_selected_and_the_model_is_restored(fused):
    model = _model(fused)
    snapshot = _snapshot(model)
    dropped = [[0, 3], [1]]
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(4))
    with inf.drop_experts(model, dropped), torch.no_grad():
        out = model(tokens)
        result = generate(model, ["xyz", "0123"], 8)
    for layer, info in enumerate(out.routing):
        ro = info.router_output
        assert not torch.isin(ro.expert_ids_TK, torch.tensor(dropped[layer])).any()
        assert torch.isin(result.routing[layer].expert_ids[result.routing[layer].expert_ids >= 0],
                          torch.tensor(dropped[layer]), invert=True).all()
        # gates: the router's rule over the surviving experts (renormalised top-2: they sum to one)
        torch.testing.assert_close(ro.weights_TK.sum(-1), torch.ones(ro.weights_TK.shape[0]))
        assert (ro.scores_TE[:, dropped[layer]] == 0).all()
    _assert_restored(model, snapshot)


def test_drop_masks_the_loss_free_bias_too():
    model = _model(False, bias_update_rate=1e-3, aux_loss_weight=0.0)
    for layer in model.moe_layers():
        layer.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 would win every token
    snapshot = _snapshot(model)
    with inf.drop_experts(model, [[0], [0]]), torch.no_grad():
        out = model(_tokens())
    assert all(not (info.router_output.expert_ids_TK == 0).any() for info in out.routing)
    _assert_restored(model, snapshot)


def test_drop_refuses_too_many_and_counts_usage():
    model = _model(False)
    with pytest.raises(ValueError, match="top_k"):
        inf.drop_experts(model, [[0, 1, 2], []])
    usage = inf.expert_usage(model, [_tokens()])
    assert usage.shape == (2, 4) and int(usage.sum()) == 2 * 3 * 24 * 2
    assert inf.least_used_experts(torch.tensor([[5, 1, 9, 1], [0, 3, 2, 7]]), 0.5) == [[1, 3], [0, 2]]


@KERNELS
def test_inference_capacity_drops_in_teacher_forcing_only(fused):
    model = _model(fused)
    snapshot = _snapshot(model)
    with inf.inference_capacity(model, 0.5), torch.no_grad():
        out = model(_tokens())
        kept = sum(int(i.stats.kept_per_expert.sum()) for i in out.routing)
        assert all(i.stats.capacity == math.ceil(0.5 * 72 * 2 / 4) for i in out.routing)
        assert sum(int(i.stats.dropped_assignments) for i in out.routing) > 0 and kept < 2 * 72 * 2
        decoded = generate(model, ["ab"], 5).tokens
    assert not torch.equal(out.logits, snapshot[1])
    assert decoded == generate(model, ["ab"], 5).tokens  # decoding stays dropless
    _assert_restored(model, snapshot)


def test_knob_names_and_refusals():
    assert inf.Knob("top_k", 1, renormalize=False).name == "top-1, not renormalised"
    assert inf.Knob("drop", 0.25).name == "drop 25% least used"
    assert inf.Knob("capacity", 1.0).name == "capacity 1"
    with pytest.raises(ValueError, match="kind"):
        inf.Knob("temperature", 1.0)


def test_determinism_report():
    report = inf.determinism_report(_model(False), ["ab", "xy"], 6, seed=3, temperature=1.0, top_p=None)
    assert report["same_seed_same_text"] and report["cache_equals_recompute"]
    assert report["cache_routing_agreement"] == 1.0
    assert report["first_difference"]["same_seed"] is None
