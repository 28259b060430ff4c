"""Specialization analyses on constructed traces with known answers, beside their random baselines,
and the streamed collector against the model's own routing."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from workbench.analysis import (
    ProbeRecorder,
    RoutingCollector,
    RoutingCounts,
    byte_classes,
    coactivation,
    collect,
    cross_layer_consistency,
    domain_specialization_nmi,
    probe_routing,
    random_expert_sets,
    router_saturation,
    saturation_curve,
    specialization_table,
    vocabulary_specialization,
)
from workbench.analysis.specialization import independence_bias_bits, mutual_information_bits
from workbench.model import MoELM


def random_topk(T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """(T, K) uniformly random K-subsets: random routing with a balanced load."""
    return torch.rand(T, E, generator=torch.Generator().manual_seed(seed)).topk(K, dim=1).indices


def counts_from(ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    return torch.bincount(ids_TK.flatten(), minlength=E)


# --- domain specialization ---------------------------------------------------------------------------


def test_domain_nmi_is_one_when_each_domain_has_experts_of_its_own():
    # top-2 of 4: domain 0 always {0, 1}, domain 1 always {2, 3}
    counts_DE = torch.tensor([[500, 500, 0, 0], [0, 0, 300, 300]])
    result = domain_specialization_nmi(counts_DE, torch.tensor([500, 300]))
    assert result.score == pytest.approx(1.0)
    # the baseline is the Miller-Madow bias (D-1)(E-1) / (2 N ln 2) bits over min(H(D), H(E)) bits
    h_d = -(0.625 * math.log2(0.625) + 0.375 * math.log2(0.375))
    assert result.mi_baseline_bits == pytest.approx(3 / (2 * 1600 * math.log(2)))
    assert result.baseline == pytest.approx(result.mi_baseline_bits / h_d)
    assert result.excess > 0.99
    # OLMoE's share: every token of domain 0 goes to experts 0 and 1; baseline q_e = load / tokens
    torch.testing.assert_close(result.share_DE[0], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(result.share_baseline_E, torch.tensor([500, 500, 300, 300]) / 800.0,
                               check_dtype=False)


def test_domain_nmi_is_zero_when_domains_use_experts_alike_and_kl_terms_sum_to_the_mi():
    same = domain_specialization_nmi(torch.tensor([[20, 60, 20], [10, 30, 10]]))
    assert same.score == pytest.approx(0.0, abs=1e-12)
    assert same.kl_bits_D.abs().max() < 1e-12
    counts_DE = torch.tensor([[30, 10, 0], [10, 30, 20]])
    result = domain_specialization_nmi(counts_DE)
    p_d = counts_DE.sum(dim=1).double() / counts_DE.sum()
    assert float((p_d * result.kl_bits_D).sum()) == pytest.approx(result.mi_bits)
    torch.testing.assert_close(result.p_expert_given_domain_DE.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(result.load_E, torch.tensor([40, 40, 20]) / 100.0, check_dtype=False)


def test_random_routing_with_an_uneven_load_scores_its_baseline():
    """Independent of the domain, with an uneven load: the NMI is the sampling bias, as predicted."""
    g = torch.Generator().manual_seed(0)
    D, E, T = 3, 8, 4000
    q_E = torch.tensor([0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.1], dtype=torch.float64)  # sums to k = 2
    scores, baselines = [], []
    for _ in range(20):
        hot_TE = random_expert_sets(q_E, T, g)
        domain_T = torch.randint(0, D, (T,), generator=g)
        counts_DE = torch.zeros(D, E, dtype=torch.float64).index_add_(0, domain_T, hot_TE)
        result = domain_specialization_nmi(counts_DE)
        scores.append(result.mi_bits)
        baselines.append(result.mi_baseline_bits)
    mean = sum(scores) / len(scores)
    # the first-order bias predicts the mean plug-in MI of independent data within sampling error;
    # a token's k distinct experts make the true bias a little smaller than the formula
    assert 0.6 * baselines[0] < mean < 1.2 * baselines[0]


def test_mutual_information_helpers_agree_with_the_existing_domain_mi():
    from workbench.analysis import domain_expert_mutual_information

    counts = torch.tensor([[30, 10, 0], [10, 30, 20]])
    assert mutual_information_bits(counts.double()) == pytest.approx(domain_expert_mutual_information(counts))
    assert independence_bias_bits(torch.zeros(2, 3)) == 0.0


def test_one_domain_has_no_domain_specialization_to_measure():
    result = domain_specialization_nmi(torch.tensor([[5, 7, 9]]))
    assert math.isnan(result.score) and math.isnan(result.baseline)


def test_domain_specialization_rejects_bad_counts_naming_the_argument():
    with pytest.raises(ValueError, match="domain_expert_DE"):
        domain_specialization_nmi(torch.ones(3))
    with pytest.raises(ValueError, match="domain_expert_DE holds negative"):
        domain_specialization_nmi(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="domain_tokens_D"):
        domain_specialization_nmi(torch.ones(2, 3), torch.ones(3))


# --- vocabulary specialization ------------------------------------------------------------------------


def test_a_token_always_sent_to_the_same_expert_has_vocabulary_specialization_one():
    E, K = 8, 2
    n_V = torch.tensor([100, 400, 0, 3])
    counts_VE = torch.zeros(4, E, dtype=torch.long)
    counts_VE[0, 3] = 100  # token 0: expert 3 every time (its second expert varies)
    counts_VE[0, :3] = torch.tensor([40, 30, 30])
    counts_VE[1] = counts_from(random_topk(400, E, K, seed=1), E)  # token 1: random
    counts_VE[3, 0] = 3  # token 3: too rare
    result = vocabulary_specialization(counts_VE, n_V, min_count=10)
    assert result.specialization_V[0] == 1.0 and int(result.top_expert_V[0]) == 3
    assert math.isnan(result.specialization_V[2]) and math.isnan(result.specialization_V[3])
    assert result.tokens_kept == 2
    # the same load includes token 0's preference for expert 3, so random routing with it would send
    # any token to expert 3 at q_3 (more than k/E); with 400 occurrences, by chance a little more
    q_E = result.load_rate_E
    assert int(q_E.argmax()) == 3 and q_E.max() > K / E
    assert result.baseline_V[1] > q_E.max() - 0.01
    # occurrence-weighted and per-id means
    kept = torch.tensor([0, 1])
    assert result.score == pytest.approx(float((result.specialization_V[kept] * n_V[kept]).sum() / 500))
    assert result.score_per_id == pytest.approx(float(result.specialization_V[kept].mean()))


def test_vocabulary_baseline_is_the_expected_share_of_random_routing_with_the_same_load():
    """Many tokens routed by uniformly random top-2 of 8: the average score equals the baseline, and
    the baseline tends to k/E as a token's count grows."""
    E, K, V = 8, 2, 200
    n_V = torch.randint(20, 300, (V,), generator=torch.Generator().manual_seed(0))
    counts_VE = torch.stack([counts_from(random_topk(int(n), E, K, seed=v), E) for v, n in enumerate(n_V)])
    result = vocabulary_specialization(counts_VE, n_V)
    assert result.score == pytest.approx(result.baseline, abs=0.006)
    assert result.score_per_id == pytest.approx(result.baseline_per_id, abs=0.006)
    torch.testing.assert_close(result.load_rate_E.sum(), torch.tensor(2.0, dtype=torch.float64), atol=1e-12, rtol=0)
    # a very frequent token: baseline near k / E (with the central-limit extrapolation beyond max_simulated)
    big = vocabulary_specialization(torch.tensor([[25_000] * 8]), torch.tensor([100_000]))
    assert big.baseline == pytest.approx(K / E, abs=0.005)
    assert big.score == pytest.approx(K / E)
    # reproducible: the same seed gives the same baseline
    again = vocabulary_specialization(counts_VE, n_V)
    torch.testing.assert_close(again.baseline_V, result.baseline_V, equal_nan=True)


def test_top1_counts_give_olmoe_script_variant_with_baseline_one_over_e():
    E = 4
    counts_VE = torch.tensor([[0, 50_000, 0, 0], [12_500, 12_500, 12_500, 12_500]])
    result = vocabulary_specialization(counts_VE, torch.tensor([50_000, 50_000]))
    assert result.specialization_V.tolist() == [1.0, 0.25]
    # load: expert 1 gets 62.5% of the top-1 choices, so random routing would give token 0 about 0.625
    assert result.baseline_V[1] == pytest.approx(0.625, abs=0.01)
    assert result.load_rate_E.sum().item() == pytest.approx(1.0)
    balanced = vocabulary_specialization(torch.full((3, E), 2_500), torch.full((3,), 10_000))
    assert balanced.baseline == pytest.approx(1 / E, abs=0.01)


def test_vocabulary_specialization_per_byte_class():
    classes = byte_classes()
    assert sum(len(v) for v in classes.values()) == 256
    assert set().union(*map(set, classes.values())) == set(range(256))
    assert ord("a") in classes["letters"] and ord("7") in classes["digits"] and ord("\n") in classes["whitespace"]
    assert ord(",") in classes["punctuation"] and 0xC3 in classes["non_ascii"] and 0 in classes["other"]
    E = 4
    counts_VE = torch.zeros(256, E, dtype=torch.long)
    n_V = torch.zeros(256, dtype=torch.long)
    for b in classes["digits"]:  # digits: always expert 2
        counts_VE[b, 2], n_V[b] = 100, 100
    for b in classes["letters"]:  # letters: spread evenly
        counts_VE[b], n_V[b] = torch.tensor([25, 25, 25, 25]), 100
    result = vocabulary_specialization(counts_VE, n_V, classes=classes)
    assert result.per_class["digits"].score == 1.0
    assert result.per_class["letters"].score == 0.25
    assert math.isnan(result.per_class["non_ascii"].score)  # no non-ASCII byte occurred
    assert result.per_class["digits"].excess > 0.4
    with pytest.raises(ValueError, match=r"classes\['bad'\]"):
        vocabulary_specialization(counts_VE, n_V, classes={"bad": [300]})


def test_vocabulary_specialization_takes_the_sparse_counts_and_names_bad_arguments():
    dense = torch.tensor([[3, 0], [0, 12], [6, 6]])
    sparse = dense.to_sparse()
    n_V = torch.tensor([3, 12, 12])
    a = vocabulary_specialization(dense, n_V, min_count=1)
    b = vocabulary_specialization(sparse, n_V, min_count=1)
    torch.testing.assert_close(a.specialization_V, b.specialization_V)
    with pytest.raises(ValueError, match="token_count_V"):
        vocabulary_specialization(dense, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="min_count"):
        vocabulary_specialization(dense, n_V, min_count=0)


def test_random_expert_sets_have_the_asked_inclusion_rates_and_k_distinct_experts():
    g = torch.Generator().manual_seed(0)
    q_E = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.1], dtype=torch.float64)
    sets = random_expert_sets(q_E, 100_000, g)
    assert set(sets.sum(dim=1).tolist()) == {2.0} and sets.max() == 1
    torch.testing.assert_close(sets.mean(dim=0), q_E, atol=0.01, rtol=0)


# --- co-activation -----------------------------------------------------------------------------------


def test_coactivation_of_fixed_pairs_and_its_balanced_baseline():
    # top-2 of 4: half the tokens go to {0, 1}, half to {2, 3}
    ids_TK = torch.tensor([[0, 1]] * 50 + [[2, 3]] * 50)
    hot_TE = torch.zeros(100, 4).scatter_(1, ids_TK, 1.0)
    result = coactivation((hot_TE.t() @ hot_TE).long(), tokens=100)
    p = result.p_b_given_a_EE
    assert p[0, 1] == 1.0 and p[0, 2] == 0.0 and p[2, 3] == 1.0 and math.isnan(p[0, 0])
    assert result.score == 1.0
    # balanced load: P0(b | a) = (k - 1) / (E - 1) = 1/3 everywhere off the diagonal
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(result.baseline_EE[off], torch.full((12,), 1 / 3, dtype=torch.float64))
    assert result.baseline == pytest.approx(1 / 3)


def test_coactivation_rows_sum_to_k_minus_one_and_random_sets_score_near_the_baseline():
    E, K, T = 8, 3, 20_000
    ids_TK = random_topk(T, E, K, seed=3)
    hot_TE = torch.zeros(T, E).scatter_(1, ids_TK, 1.0)
    result = coactivation((hot_TE.t() @ hot_TE).long(), tokens=T)
    torch.testing.assert_close(result.p_b_given_a_EE.nansum(dim=1), torch.full((E,), K - 1.0, dtype=torch.float64))
    assert result.baseline == pytest.approx((K - 1) / (E - 1), abs=0.01)  # the load is balanced up to noise
    assert result.score == pytest.approx(result.baseline, abs=0.02)
    # an uneven load: the baseline rows still sum to k - 1 in expectation of the proportional draw
    q = torch.tensor([0.9, 0.6, 0.3, 0.2], dtype=torch.float64)
    sets = random_expert_sets(q, 50_000, torch.Generator().manual_seed(1))
    uneven = coactivation((sets.t() @ sets).round().long(), tokens=50_000)
    torch.testing.assert_close(uneven.baseline_EE.nansum(dim=1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="tokens"):
        coactivation(torch.eye(3), tokens=0)


# --- router saturation -------------------------------------------------------------------------------


def test_router_saturation_identical_disjoint_and_independent_routing():
    E, K, P = 8, 2, 5000
    final = random_topk(P, E, K, seed=0)
    same = router_saturation(final, final, E)
    assert same.score == 1.0 and same.top1 == 1.0
    # k/E and 1/E when both checkpoints are balanced
    assert same.baseline == pytest.approx(K / E, abs=0.01) and same.top1_baseline == pytest.approx(1 / E, abs=0.01)
    disjoint = router_saturation(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[2, 3], [0, 1]]), 4)
    assert disjoint.score == 0.0 and disjoint.top1 == 0.0
    half = router_saturation(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 2], [2, 1]]), 4)
    assert half.score == 0.5 and half.top1 == 1.0  # the first experts agree, the second ones do not
    independent = router_saturation(random_topk(P, E, K, seed=1), final, E)
    assert independent.score == pytest.approx(independent.baseline, abs=0.02)
    assert independent.top1 == pytest.approx(independent.top1_baseline, abs=0.02)


def test_router_saturation_skips_padding_slots_and_names_bad_arguments():
    t = torch.tensor([[0, -1], [1, 2]])
    f = torch.tensor([[0, 3], [2, -1]])
    result = router_saturation(t, f, 4)
    assert result.score == pytest.approx((1 / 2 + 1 / 1) / 2)
    with pytest.raises(ValueError, match="same probe set"):
        router_saturation(t, f[:1], 4)
    with pytest.raises(ValueError, match="num_experts"):
        router_saturation(t, f, 3)


def test_saturation_curve_ends_at_one():
    final = random_topk(100, 4, 2, seed=0).unsqueeze(0)
    early = random_topk(100, 4, 2, seed=1).unsqueeze(0)
    rows = saturation_curve([(10, early), (20, final)], [1], 4)
    assert [r["step"] for r in rows] == [10, 20] and rows[-1]["saturation"] == 1.0
    assert rows[0]["saturation"] < 1.0 and set(rows[0]) == {"step", "layer", "saturation", "baseline", "top1",
                                                             "top1_baseline"}


# --- cross-layer consistency -------------------------------------------------------------------------


def test_cross_layer_nmi_is_one_for_a_fixed_path_and_near_its_baseline_when_independent():
    E, K, T = 8, 2, 20_000
    first = random_topk(T, E, K, seed=0)
    shift = (first + 3) % E  # layer l + 1 is a fixed function of layer l
    hot_a = torch.zeros(T, E).scatter_(1, first, 1.0)
    hot_b = torch.zeros(T, E).scatter_(1, shift, 1.0)
    fixed = cross_layer_consistency((hot_a.t() @ hot_b).long())
    # all pairs: a fixed map of top-2 sets leaves b = a + 3 or the token's other expert's image, so
    # H(b | a) = 1 + log2(7) / 2 bits of H(b) = 3: NMI = (2 - log2(7) / 2) / 3
    assert fixed.score == pytest.approx((2 - math.log2(7) / 2) / 3, abs=0.01)
    # first experts: the next one is exactly determined
    path = cross_layer_consistency(torch.diag(torch.full((E,), 100)).roll(3, dims=1))
    assert path.score == pytest.approx(1.0)
    hot_c = torch.zeros(T, E).scatter_(1, random_topk(T, E, K, seed=7), 1.0)
    independent = cross_layer_consistency((hot_a.t() @ hot_c).long())
    assert independent.score < 3 * independent.baseline
    torch.testing.assert_close(independent.load_next_E.sum(), torch.tensor(1.0, dtype=torch.float64))


# --- the collector ------------------------------------------------------------------------------------


def test_collector_counts_match_the_models_own_routing(micro, micro_data):
    torch.manual_seed(0)
    model = MoELM(micro).eval()
    batches = [b for bs in micro_data.val_batches().values() for b in bs]
    probe = batches[0].tokens
    counts = collect(model, batches, domains=micro_data.domains, probe_tokens=probe)
    L, E, K = len(micro.moe_layers), micro.moe.num_experts, micro.moe.top_k
    T = sum(b.tokens.numel() for b in batches)
    assert counts.tokens == T and counts.domains == micro_data.domains and counts.layers == micro.moe_layers
    expected_DE = torch.zeros(L, len(micro_data.domains), E, dtype=torch.long)
    expected_top1 = [torch.zeros(256, E, dtype=torch.long) for _ in range(L)]
    with torch.no_grad():
        for b in batches:
            out = model(b.tokens)
            for li, info in enumerate(out.routing):
                ids_TK, w_TK = info.router_output.expert_ids_TK, info.router_output.weights_TK
                d_TK = b.domains.reshape(-1, 1).expand_as(ids_TK)
                expected_DE[li].index_put_((d_TK.flatten(), ids_TK.flatten()), torch.ones(1, dtype=torch.long),
                                           accumulate=True)
                first_T = ids_TK.gather(1, w_TK.argmax(dim=1, keepdim=True)).flatten()
                expected_top1[li].index_put_((b.tokens.flatten(), first_T), torch.ones(1, dtype=torch.long),
                                             accumulate=True)
    assert torch.equal(counts.domain_expert_LDE, expected_DE)
    for li in range(L):
        assert torch.equal(counts.token_top1[li].to_dense(), expected_top1[li])
        assert int(counts.token_expert[li].to_dense().sum()) == T * K
        assert torch.equal(counts.coactivation_LEE[li].diagonal(), expected_DE[li].sum(dim=0))
    assert torch.equal(counts.transition_LEE.sum(dim=(1, 2)), torch.full((L - 1,), T * K * K))
    assert torch.equal(counts.transition_top1_LEE.sum(dim=(1, 2)), torch.full((L - 1,), T))
    assert torch.equal(counts.transition_top1_LEE[0].sum(dim=1), expected_top1[0].sum(dim=0))
    assert int(counts.token_count_V.sum()) == T and int(counts.domain_tokens_D.sum()) == T
    assert torch.equal(counts.probe_topk_LPK, probe_routing(model, probe))
    assert counts.probe_topk_LPK.shape == (L, probe.numel(), K)
    # plain data round trip
    again = RoutingCounts.from_dict(json.loads(json.dumps(counts.to_dict())))
    assert torch.equal(again.domain_expert_LDE, counts.domain_expert_LDE)
    assert torch.equal(again.token_expert[1].to_dense(), counts.token_expert[1].to_dense())
    assert torch.equal(again.probe_topk_LPK, counts.probe_topk_LPK) and again.transition_LEE.shape == (L - 1, E, E)
    assert torch.equal(again.transition_top1_LEE, counts.transition_top1_LEE)
    rows = specialization_table(counts, classes=byte_classes())
    assert [r["layer"] for r in rows] == micro.moe_layers
    assert math.isnan(rows[-1]["cross_layer"]) and not math.isnan(rows[0]["cross_layer"])
    assert "vocab/digits_baseline" in rows[0]


def test_collector_honours_expert_choice_padding(micro, tokens):
    import warnings
    from dataclasses import replace

    from workbench.moe import CausalLeakWarning

    cfg = micro.replace(moe=replace(micro.moe, router="expert_choice"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CausalLeakWarning)
        model = MoELM(cfg)
    counts = collect(model, [tokens])
    with torch.no_grad():
        out = model.eval()(tokens)
    for li, info in enumerate(out.routing):
        real = int(info.router_output.mask_TK.sum())
        assert int(counts.domain_expert_LDE[li].sum()) == real == int(counts.token_expert[li].to_dense().sum())
    assert counts.top_k == cfg.moe.num_experts


def test_collector_merges_in_chunks_and_names_bad_input(monkeypatch):
    import workbench.analysis.traces as traces

    monkeypatch.setattr(traces, "_MERGE_EVERY_TOKENS", 10)
    collector = RoutingCollector([0], num_experts=4, top_k=1, vocab_size=8)
    for i in range(5):
        ids = torch.tensor([[i % 4]] * 6)
        collector.add([(ids, torch.ones(6, 1), None)], torch.full((6,), i))
    dense = collector.counts().token_expert[0].to_dense()
    assert dense.sum() == 30 and dense[4, 0] == 6 and dense[1, 1] == 6
    with pytest.raises(ValueError, match="token_ids"):
        collector.add([(ids, torch.ones(6, 1), None)], torch.full((6,), 8))
    with pytest.raises(ValueError, match="domain_ids"):
        collector.add([(ids, torch.ones(6, 1), None)], torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="routing has 2 layers"):
        collector.add([(ids, torch.ones(6, 1), None)] * 2, torch.zeros(6))
    with pytest.raises(ValueError, match="num_experts"):
        RoutingCollector([0], num_experts=0, top_k=1, vocab_size=8)
    with pytest.raises(ValueError, match="dense"):
        collect(SimpleNamespace(cfg=SimpleNamespace(moe=None)), [])


def test_probe_recorder_routes_the_probe_at_every_validation(micro, micro_data):
    torch.manual_seed(0)
    model = MoELM(micro)
    probe = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    recorder = ProbeRecorder(probe, counts_every_eval=True)
    trainer = SimpleNamespace(model=model, data=micro_data, step=5)
    recorder(trainer, {"loss": 1.0})  # no validation at this step: nothing recorded
    assert recorder.probes == []
    recorder(trainer, {"loss": 1.0, "val/loss": 2.0})
    trainer.step = 10
    recorder(trainer, {"loss": 1.0, "val/loss": 2.0})
    assert [s for s, _ in recorder.probes] == [5, 10] and [s for s, _ in recorder.counts] == [5, 10]
    assert model.training  # the mode is restored
    rows = saturation_curve(recorder.probes, micro.moe_layers, micro.moe.num_experts)
    assert all(r["saturation"] == 1.0 for r in rows)  # the model did not change between the two
