"""The expert-cache simulator against hand-traced sequences, Belady against an exhaustive optimum and
never worse than LRU or LFU, the random-routing baseline's loads, time per token by hand, and the
traces recorded from generation (workbench and Hugging Face) against independent forwards."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tests.analysis.helpers import MICRO
from workbench.analysis import offload as off
from workbench.model import MoELM


def singles(seq):
    return [frozenset([e]) for e in seq]


# Capacity 2, one expert per step: 0 1 2 0 1 3 0 3
#   LRU (cache after the step, least recent first):
#     0 miss [0] | 1 miss [0 1] | 2 miss [1 2] | 0 miss [2 0] | 1 miss [0 1] | 3 miss [1 3]
#     | 0 miss [3 0] | 3 hit [0 3]                                         -> 1 hit
#   LFU (frequency of every request so far, ties: least recent):
#     0 m [0] | 1 m [0 1] | 2 m: 0,1 both once, 0 older -> [1 2] | 0 m: 1,2 once, 1 older -> [2 0]
#     | 1 m: 2 once, 0 twice -> [0 1] | 3 m: 0,1 twice, 0 older -> [1 3] | 0 m: 1 twice, 3 once -> [1 0]
#     | 3 m: 1 twice, 0 thrice -> [0 3]                                   -> 0 hits
#   Belady (keep the two needed soonest, bypass allowed):
#     0 m {0} | 1 m {0 1} | 2 m: next uses 0@3 1@4 2@never -> {0 1} | 0 hit | 1 hit
#     | 3 m: 0@6 1@never 3@7 -> {0 3} | 0 hit | 3 hit                      -> 4 hits (only the 4 first uses miss)
HAND = singles([0, 1, 2, 0, 1, 3, 0, 3])


@pytest.mark.parametrize(("policy", "hits"), [("lru", 1), ("lfu", 0), ("belady", 4)])
def test_single_expert_steps_by_hand(policy, hits):
    s = off.simulate(HAND, 2, policy)
    assert (s.requests, s.hits, s.demand_loads, s.prefetch_loads) == (8, hits, 8 - hits, 0)
    assert s.hit_rate == hits / 8


# Capacity 3, a set of experts per step: {0 1} {1 2} {0 3} {1 2}
#   LRU: 2 misses [0 1] | 1 hit, 2 miss [0 1 2] | 0 hit, 3 miss, evict 1 -> [2 0 3]
#        | 2 hit, 1 miss, evict 0 -> [3 1 2]                                  -> 3 hits of 8
#   Belady: {0 1} | 1 hit, 2 miss: {0 1 2} | 0 hit, 3 miss: 0 and 3 never again, 1 and 2 next step
#        -> drop one of 0, 3 | 1 hit, 2 hit                                   -> 4 hits of 8
SETS = [frozenset({0, 1}), frozenset({1, 2}), frozenset({0, 3}), frozenset({1, 2})]


@pytest.mark.parametrize(("policy", "hits"), [("lru", 3), ("belady", 4)])
def test_set_steps_by_hand(policy, hits):
    s = off.simulate(SETS, 3, policy)
    assert (s.requests, s.hits) == (8, hits)


def test_a_step_larger_than_the_cache_streams_its_extra_experts():
    # capacity 1, {0 1} twice: both miss, one stays; the next step hits it and misses the other
    for policy in off.POLICIES:
        s = off.simulate([frozenset({0, 1})] * 2, 1, policy)
        assert (s.requests, s.hits, s.demand_loads) == (4, 1, 3)
    assert off.simulate(HAND, 0, "lru").hits == 0


def test_prefetch_by_hand():
    # LRU, capacity 2: guesses {0} {1} {3} before steps {0} {1} {2}: two guessed right, three copies
    # of guesses and one demand copy (2)
    s = off.simulate(singles([0, 1, 2]), 2, "lru", prefetch=singles([0, 1, 3]))
    assert (s.hits, s.demand_loads, s.prefetch_loads, s.prefetch_hits, s.loads) == (2, 1, 3, 2, 4)
    assert s.prefetch_recall == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="prefetch"):
        off.simulate(HAND, 2, "belady", prefetch=HAND)


def optimal_hits(steps, capacity, num_experts):
    """Exhaustive optimum: after each step the cache may hold any subset (at most ``capacity``) of what
    it held and what the step copied in."""
    best = {frozenset(): 0}
    for needed in steps:
        nxt: dict[frozenset, int] = {}
        for cache, hits in best.items():
            pool = sorted(cache | needed)
            got = hits + len(cache & needed)
            for r in range(min(capacity, len(pool)) + 1):
                for keep in itertools.combinations(pool, r):
                    k = frozenset(keep)
                    if nxt.get(k, -1) < got:
                        nxt[k] = got
        best = nxt
    return max(best.values())


def random_steps(rng, n, num_experts, max_set):
    return [frozenset(rng.choice(num_experts, size=rng.integers(1, max_set + 1), replace=False).tolist())
            for _ in range(n)]


def test_belady_is_the_exhaustive_optimum_on_small_random_traces():
    rng = np.random.default_rng(0)
    for _ in range(30):
        steps = random_steps(rng, 9, 5, 3)
        capacity = int(rng.integers(1, 4))
        assert off.simulate(steps, capacity, "belady").hits == optimal_hits(steps, capacity, 5)


def test_belady_never_worse_than_lru_or_lfu():
    rng = np.random.default_rng(1)
    for _ in range(60):
        E = int(rng.integers(2, 12))
        steps = random_steps(rng, 80, E, min(E, 4))
        # a skewed load now and then, as trained routers have
        if rng.random() < 0.5:
            p = rng.dirichlet(np.full(E, 0.3))
            steps = [frozenset(rng.choice(E, size=min(2, E), replace=False, p=p).tolist()) for _ in range(80)]
        for capacity in range(0, E + 1):
            belady = off.simulate(steps, capacity, "belady").hits
            assert belady >= off.simulate(steps, capacity, "lru").hits
            assert belady >= off.simulate(steps, capacity, "lfu").hits
        # a cache of every expert misses each expert once
        assert off.simulate(steps, E, "lru").demand_loads == len(set().union(*steps))


def toy_trace(seed=0, L=2, B=4, N=12, K=2, E=6, P=3):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([np.stack([rng.choice(E, size=K, replace=False) for _ in range(N)])
                              for _ in range(B)]) for _ in range(L)])
    return off.ExpertTrace(ids, E, P)


def test_decode_steps_take_the_union_of_a_batch():
    ids = np.array([[[0, 1], [2, 3], [4, 5]], [[1, 2], [2, 5], [-1, -1]]])  # (B=2, N=3, K=2)
    assert off.decode_steps(ids, 2) == [frozenset({0, 1, 2}), frozenset({2, 3, 5}), frozenset({4, 5})]
    assert off.decode_steps(ids, 1) == [frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}),
                                        frozenset({1, 2}), frozenset({2, 5})]
    with pytest.raises(ValueError, match="batch"):
        off.decode_steps(ids, 3)


def test_shuffled_trace_keeps_loads_and_sets_but_not_order():
    trace = toy_trace(N=40)
    shuffled = off.shuffled_trace(trace, seed=3)
    np.testing.assert_array_equal(shuffled.loads(), trace.loads())
    P = trace.prompt_len
    np.testing.assert_array_equal(shuffled.expert_ids[:, :, :P], trace.expert_ids[:, :, :P])

    def sets(t, layer):
        return sorted(tuple(sorted(r)) for r in t.decode_ids()[layer].reshape(-1, t.top_k).tolist())

    for layer in range(trace.num_layers):
        assert sets(shuffled, layer) == sets(trace, layer)
    assert not np.array_equal(shuffled.expert_ids, trace.expert_ids)


def test_hit_rate_table_rows():
    trace = toy_trace()
    trace.prefetch["gate_input"] = trace.expert_ids.copy()  # a perfect guess
    rows = off.hit_rate_table(trace, [1, 6], batches=[1, 2], prefetch=["gate_input"])
    # per layer and batch: 3 policies x 2 capacities; layer 1 also lru/lfu + prefetch
    assert len(rows) == 2 * (6 + 4) + 2 * 6
    # a cache that holds a step's guesses then never stalls (a cache of 1 cannot hold 2 guesses)
    perfect = [r for r in rows if r["policy"] == "lru+gate_input" and r["capacity"] == 6]
    assert len(perfect) == 2 and all(r["hit_rate"] == 1.0 and r["demand_loads"] == 0 for r in perfect)
    full = [r for r in rows if r["capacity"] == 6 and "+" not in r["policy"]]
    assert all(r["demand_loads"] <= 6 for r in full)
    recall = off.prefetch_recall(trace, "gate_input")
    assert math.isnan(recall[0]) and recall[1] == 1.0


def test_time_per_token_by_hand():
    # 1 copy per step and layer, 2 layers, 1 GB experts over 10 GB/s, 2 tokens per step: 0.1 s a token
    assert off.time_per_token(1.0, 2, 1e9, 10.0, batch=2) == pytest.approx(0.1)
    # Mixtral's expert: 3 x 4096 x 14336 bf16 values
    assert off.expert_bytes(4096, 14336, "bf16") == 3 * 4096 * 14336 * 2
    assert off.expert_bytes(4096, 14336, "int4") == 3 * 4096 * 14336 / 2
    assert off.host_link("H100") > off.host_link("A100") > 0  # PCIe 5.0 against PCIe 4.0
    assert "devices.yaml" in off.host_link_source("H100") or "PCIe" in off.host_link_source("H100")


def test_trace_round_trips_through_arrays(tmp_path):
    trace = toy_trace()
    trace.prefetch["residual"] = trace.expert_ids.copy()
    np.savez_compressed(tmp_path / "t.npz", **trace.to_arrays())
    with np.load(tmp_path / "t.npz") as f:
        back = off.ExpertTrace.from_arrays(f)
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    np.testing.assert_array_equal(back.prefetch["residual"], trace.prefetch["residual"])
    assert (back.num_experts, back.prompt_len) == (trace.num_experts, trace.prompt_len)


def test_generation_trace_matches_routing_and_an_independent_guess():
    torch.manual_seed(0)
    model = MoELM(MICRO).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]]
    trace = off.generation_trace(model, prompts, 10, seed=0)
    L, B, N, K = trace.expert_ids.shape
    assert (L, B, N, K) == (2, 3, 14, 2) and trace.tokens.shape == (3, 14)
    # the teacher-forced forward of the same tokens routes them alike, and layer 0's block output
    # through layer 1's norm and router gives the recorded block_output guess
    captured = {}
    handle = model.blocks[0].register_forward_hook(lambda m, a, out: captured.update(x=out[0]))
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(trace.tokens))
    finally:
        handle.remove()
    forced = torch.stack([r.router_output.expert_ids_TK.view(B, N, K) for r in out.routing]).numpy()
    np.testing.assert_array_equal(np.sort(forced, -1), np.sort(trace.expert_ids, -1))
    nxt = model.blocks[1]
    with torch.no_grad():
        guess = nxt.ffn.router(nxt.ffn_norm(captured["x"]).reshape(B * N, -1), None).expert_ids_TK.view(B, N, K)
    np.testing.assert_array_equal(np.sort(guess.numpy(), -1), np.sort(trace.prefetch["block_output"][1], -1))
    assert (trace.prefetch["gate_input"][0] == -1).all()
    # next layer's router on the state it will see at its own input is a fair guess: better than chance
    assert np.nanmean(off.prefetch_recall(trace, "block_output")) > K / MICRO.moe.num_experts


def test_generation_trace_records_one_guess_per_call_in_deeper_models():
    from dataclasses import replace

    torch.manual_seed(1)
    model = MoELM(replace(MICRO, n_layers=4)).eval()
    trace = off.generation_trace(model, [[1, 2, 3], [4, 5, 6]], 5, seed=0)
    assert trace.expert_ids.shape == (4, 2, 8, 2)
    for source in off.PREFETCH_SOURCES:
        guess = trace.prefetch[source]
        assert (guess[0] == -1).all() and (guess[1:] >= 0).all()


def test_hf_generation_trace_matches_a_teacher_forced_forward():
    pytest.importorskip("transformers")
    from tests.interop.test_hf import tiny_model
    from workbench.interop import hf_routing_hooks

    model = tiny_model("mixtral")
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    trace = off.hf_generation_trace(model, prompt, 6)
    assert trace.expert_ids.shape == (2, 2, 11, 2) and trace.tokens.shape == (2, 11)
    with torch.no_grad(), hf_routing_hooks(model) as hooks:
        model(input_ids=torch.as_tensor(trace.tokens), use_cache=False)
        forced = np.stack([ids.reshape(2, 11, -1).numpy() for ids, _, _ in hooks.routing()])
    np.testing.assert_array_equal(np.sort(forced, -1), np.sort(trace.expert_ids, -1))
