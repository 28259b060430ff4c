"""EPLB placement: hand cases, never worse than round-robin, replicas kept apart and loads conserved,
and the decode step-time factor by hand."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.analysis import eplb


def test_round_robin_by_hand():
    # experts 0 and 2 on device 0 (4 + 2), 1 and 3 on device 1 (3 + 1): max 6, mean 5
    p = eplb.round_robin([4, 3, 2, 1], 2)
    assert p.device_loads == (6.0, 4.0) and p.imbalance == pytest.approx(1.2)


def test_placement_is_optimal_on_a_hand_case():
    # heaviest first: 4 -> d0, 3 -> d1, 2 -> d1 (3 < 4), 1 -> d0: 5 and 5, the optimum (total 10 / 2)
    p = eplb.place([4, 3, 2, 1], 2)
    assert sorted(p.device_loads) == [5.0, 5.0] and p.imbalance == 1.0 and p.method == "eplb"
    assert sorted(p.experts_on(0) + p.experts_on(1)) == [0, 1, 2, 3]


def test_replicas_split_a_hot_expert_by_hand():
    # loads 6 and 2, two redundant slots: the first extra replica goes to expert 0 (6 > 2: now 3, 3, 2),
    # the second to expert 0 again (3 > 2: now 2, 2, 2, 2); two slots per device: 4 and 4
    assert eplb.replicate([6, 2], 2).tolist() == [3, 1]
    p = eplb.place([6, 2], 2, redundant=2)
    assert p.device_loads == (4.0, 4.0) and p.imbalance == 1.0
    assert eplb.round_robin([6, 2], 2).imbalance == pytest.approx(1.5)  # 6 / mean 4


def test_lpt_alone_can_lose_to_round_robin_and_place_keeps_the_better():
    # LPT on 3 3 2 2 2 over 2 devices gives 7 / 5; this order puts 2 2 2 and 3 3 together (6 / 6)
    loads = [2, 3, 2, 3, 2]
    assert eplb.round_robin(loads, 2).max_load == 6.0
    assert eplb.place(loads, 2).max_load == 6.0


@pytest.mark.parametrize("seed", range(20))
def test_placement_never_worse_than_round_robin(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.choice([4, 8, 16, 32]))
    G = int(rng.choice([d for d in (1, 2, 4, 8) if d <= E]))
    loads = rng.pareto(1.2, size=E) * 100  # heavy-tailed, as trained routers' loads can be
    for R in (0, G, 2 * G):
        p = eplb.place(loads, G, R)
        assert p.max_load <= eplb.round_robin(loads, G).max_load + 1e-9
        # every expert placed, its replicas' loads summing to its load, on distinct devices
        got = np.zeros(E)
        np.add.at(got, list(p.replica_expert), list(p.replica_load))
        np.testing.assert_allclose(got, loads)
        assert sum(p.device_loads) == pytest.approx(loads.sum())
        if p.method == "eplb":
            for e in range(E):
                devs = [d for x, d in zip(p.replica_expert, p.replica_device, strict=True) if x == e]
                assert len(devs) == len(set(devs)) or len(devs) > G
            slots = np.bincount(list(p.replica_device), minlength=G)
            assert slots.max() - slots.min() <= 1


def test_more_replicas_never_hurt_on_random_loads():
    rng = np.random.default_rng(7)
    for _ in range(10):
        loads = rng.pareto(1.0, size=16) * 10
        before = eplb.place(loads, 4, 0).max_load
        assert eplb.place(loads, 4, 8).max_load <= before + 1e-9


def test_step_time_factor_by_hand():
    # 60% of the balanced step in the experts, the busiest device 1.5 x the mean: 0.4 + 0.6 x 1.5 = 1.3
    assert eplb.step_time_factor(1.5, 0.6) == pytest.approx(1.3)
    assert eplb.step_time_factor(1.0, 0.7) == 1.0
    with pytest.raises(ValueError, match="imbalance_ratio"):
        eplb.step_time_factor(0.5, 0.5)


def test_layers_imbalance_adds_per_layer_maxima():
    # layer 1: max 6, mean 5; layer 2: max 4, mean 3 -> (6 + 4) / (5 + 3) = 1.25
    p1, p2 = eplb.round_robin([4, 3, 2, 1], 2), eplb.round_robin([4, 2], 2)
    assert eplb.layers_imbalance([p1, p2]) == pytest.approx(1.25)
    rows = eplb.balance_table(np.array([[4, 3, 2, 1], [1, 1, 1, 5]]), devices=[2], redundant=[0, 2])
    assert [r["redundant"] for r in rows] == [0, 2] and all(r["after"] <= r["before"] for r in rows)
