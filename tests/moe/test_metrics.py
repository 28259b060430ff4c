"""Load metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.moe import RouterOutput, RoutingInfo, load_metrics, routing_metrics
from workbench.moe.dispatch import DispatchStats


def test_load_metrics_by_hand():
    m = load_metrics(torch.tensor([4, 0, 2, 2]))
    assert m["load_fraction"] == [0.5, 0.0, 0.25, 0.25]
    assert m["cv"] == pytest.approx(math.sqrt(2) / 2)  # population std sqrt(2), mean 2
    assert m["max_vio"] == pytest.approx(1.0)  # 4 / 2 - 1
    expected_entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert m["entropy"] == pytest.approx(expected_entropy)
    assert m["unused_experts"] == 1


def test_uniform_and_collapsed_extremes():
    uniform = load_metrics(torch.tensor([5, 5, 5, 5]))
    assert uniform["cv"] == 0 and uniform["max_vio"] == 0 and uniform["entropy"] == pytest.approx(1.0)
    collapsed = load_metrics(torch.tensor([20, 0, 0, 0]))
    assert collapsed["max_vio"] == pytest.approx(3.0) and collapsed["entropy"] == 0
    assert collapsed["unused_experts"] == 3


def test_routing_metrics_dropping_confidence_and_gate_mass():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    scores = torch.tensor([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.4, 0.4, 0.2]])
    stats = DispatchStats(tokens_per_expert=torch.tensor([3, 2, 1]), kept_per_expert=torch.tensor([2, 2, 1]),
                          dropped_assignments=torch.tensor(1), dropped_tokens=torch.tensor(0), capacity=2)
    info = RoutingInfo(RouterOutput(ids, weights, scores, scores.log()), stats, {}, torch.tensor(0.0), (1, 3))
    m = routing_metrics(info)
    assert m["dropped_fraction"] == pytest.approx(1 / 6)
    assert m["dropped_token_fraction"] == 0
    assert m["router_confidence"] == pytest.approx((0.6 + 0.8 + 0.4) / 3)
    # gate mass: expert 0 gets 0.6 + 0.9 + 0.5 = 2.0 of 3.0
    assert m["gate_mass"] == pytest.approx([2.0 / 3, 0.9 / 3, 0.1 / 3])
    assert m["tokens_per_expert"] == [3, 2, 1]


def test_routing_metrics_skip_padding_slots():
    """Expert choice style: t0 has two experts, t1 one (its second slot is padding with a
    non-zero weight, which must be ignored), t2 none."""
    ids = torch.tensor([[0, 1], [2, 0], [1, 2]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    weights = torch.tensor([[0.5, 0.3], [0.6, 0.9], [0.2, 0.2]])
    scores = torch.full((3, 3), 1 / 3)
    stats = DispatchStats.dropless(torch.bincount(ids[mask], minlength=3))
    info = RoutingInfo(RouterOutput(ids, weights, scores, scores.log(), mask), stats, {}, torch.tensor(0.0), (1, 3))
    m = routing_metrics(info)
    assert m["tokens_per_expert"] == [1, 1, 1] and m["cv"] == 0
    assert m["experts_per_token"] == pytest.approx(1.0)  # (2 + 1 + 0) / 3
    assert m["unrouted_token_fraction"] == pytest.approx(1 / 3)
    assert m["gate_mass"] == pytest.approx([0.5 / 1.4, 0.3 / 1.4, 0.6 / 1.4])
    assert m["dropped_fraction"] == 0


def test_routing_metrics_without_a_mask_report_k_experts_per_token():
    ids = torch.tensor([[0, 1], [1, 0]])
    scores = torch.full((2, 2), 0.5)
    info = RoutingInfo(RouterOutput(ids, torch.full((2, 2), 0.5), scores, scores.log()),
                       DispatchStats.dropless(torch.tensor([2, 2])), {}, torch.tensor(0.0), (1, 2))
    m = routing_metrics(info)
    assert m["experts_per_token"] == 2 and m["unrouted_token_fraction"] == 0
