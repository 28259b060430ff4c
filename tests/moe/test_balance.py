"""Balancing losses against hand-computed values, and the loss-free bias update."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import MoEConfig
from workbench.moe import (
    MoELayer,
    build_router,
    load_metrics,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
    update_router_bias,
)

PROBS = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.1, 0.9]])
IDS = torch.tensor([[0], [0], [0], [1]])


def test_switch_aux_loss_by_hand():
    # f = [3/4, 1/4], P = [0.55, 0.45]; L = 2 * (0.75 * 0.55 + 0.25 * 0.45) = 1.05
    assert switch_aux_loss(PROBS, IDS).item() == pytest.approx(1.05)


def test_switch_aux_loss_leaves_padding_out():
    mask = torch.tensor([True, True, True, False])
    # f = [1, 0], P = [(0.7 + 0.6 + 0.8) / 3, ...]; L = 2 * 1 * 0.7 = 1.4
    assert switch_aux_loss(PROBS, IDS, mask).item() == pytest.approx(1.4)


def test_switch_aux_loss_top2_divides_f_by_k():
    probs = torch.full((2, 4), 0.25)
    ids = torch.tensor([[0, 1], [0, 2]])
    # f = [2, 1, 1, 0] / (2 * 2), P = 1/4 each; L = 4 * sum(f) / 4 = 1
    assert switch_aux_loss(probs, ids).item() == pytest.approx(1.0)


def test_aux_losses_skip_padding_slots():
    ids = torch.tensor([[0, 1], [0, 0], [1, 0]])
    mask = torch.tensor([[True, False], [True, False], [True, True]])
    # real assignments: expert 0 gets t0, t1, t2 (slot 1); expert 1 gets t2 (slot 0): f = [3/4, 1/4]
    P = PROBS[:3].mean(0)
    expected = 2 * (0.75 * P[0] + 0.25 * P[1])
    assert switch_aux_loss(PROBS[:3], ids, slot_mask_TK=mask).item() == pytest.approx(expected.item())
    # sequence-wise: one sequence of three tokens, f = E * [3/4, 1/4]
    seq = sequence_aux_loss(PROBS[:3].unsqueeze(0), ids.unsqueeze(0), slot_mask_BSK=mask.unsqueeze(0))
    assert seq.item() == pytest.approx(expected.item())
    # with padding tokens too: t2 is padding, so only t0 and t1 count, both to expert 0
    token_mask = torch.tensor([True, True, False])
    assert switch_aux_loss(PROBS[:3], ids, token_mask, mask).item() == pytest.approx(2 * PROBS[:2, 0].mean().item())


def test_aux_losses_with_an_all_true_slot_mask_equal_the_unmasked_ones():
    torch.manual_seed(1)
    probs = torch.randn(4, 6, 5).softmax(-1)
    ids = torch.rand(4, 6, 5).argsort(-1)[..., :2]
    mask_BS = torch.rand(4, 6) > 0.3
    full = torch.ones(4, 6, 2, dtype=torch.bool)
    torch.testing.assert_close(sequence_aux_loss(probs, ids, mask_BS, full), sequence_aux_loss(probs, ids, mask_BS))
    flat = probs.view(24, 5), ids.view(24, 2)
    torch.testing.assert_close(switch_aux_loss(*flat, mask_BS.view(24), full.view(24, 2)),
                               switch_aux_loss(*flat, mask_BS.view(24)))


def test_the_unmasked_counting_path_equals_the_masked_path_with_every_token_real():
    """Without masks the losses count assignments with one bincount; with an all-True padding
    mask they take the one-hot path. Both must give the same numbers."""
    torch.manual_seed(2)
    probs = torch.randn(3, 7, 6).softmax(-1)
    ids = torch.rand(3, 7, 6).argsort(-1)[..., :3]
    every = torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(sequence_aux_loss(probs, ids), sequence_aux_loss(probs, ids, every))
    torch.testing.assert_close(switch_aux_loss(probs.view(21, 6), ids.view(21, 3)),
                               switch_aux_loss(probs.view(21, 6), ids.view(21, 3), every.view(21)))


def test_imbalanced_routing_scores_worse_than_balanced():
    T, E = 64, 8
    uniform = torch.full((T, E), 1 / E)
    balanced_ids = torch.arange(T).remainder(E).unsqueeze(1)
    collapsed_probs = torch.full((T, E), 0.02).index_fill(1, torch.tensor([0]), 1 - 0.02 * (E - 1))
    collapsed_ids = torch.zeros(T, 1, dtype=torch.long)
    assert switch_aux_loss(uniform, balanced_ids).item() == pytest.approx(1.0)
    assert switch_aux_loss(collapsed_probs, collapsed_ids).item() == pytest.approx(E * (1 - 0.02 * (E - 1)))
    seq = lambda p, i: sequence_aux_loss(p.view(4, 16, E), i.view(4, 16, 1)).item()  # noqa: E731
    assert seq(uniform, balanced_ids) == pytest.approx(1.0)
    assert seq(collapsed_probs, collapsed_ids) > 5


def test_sequence_aux_loss_by_hand_with_sigmoid_scores():
    # one sequence of 2 tokens, 2 experts, top-1, both to expert 0.
    # s' = [[0.5, 0.5], [0.9, 0.1]] after normalising; f = E/(K S) * [2, 0] = [2, 0];
    # P = [0.7, 0.3]; L = 2 * 0.7 = 1.4
    scores = torch.tensor([[[0.2, 0.2], [0.9, 0.1]]])
    ids = torch.tensor([[[0], [0]]])
    assert sequence_aux_loss(scores, ids).item() == pytest.approx(1.4)


def test_sequence_aux_loss_sees_per_sequence_imbalance_that_the_batch_loss_misses():
    # sequence 0 goes entirely to expert 0, sequence 1 to expert 1: the batch is balanced
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)
    ids = torch.tensor([[0]] * 4 + [[1]] * 4)
    batch = switch_aux_loss(probs, ids).item()
    per_seq = sequence_aux_loss(probs.view(2, 4, 2), ids.view(2, 4, 1)).item()
    assert batch == pytest.approx(1.0)  # f = P = [0.5, 0.5]
    assert per_seq == pytest.approx(2 * 0.9)  # each sequence: f = [2, 0], P = [0.9, 0.1]


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2, ln 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    assert router_z_loss(logits, torch.tensor([True, False])).item() == pytest.approx(math.log(2) ** 2)


def test_bias_update_sign_rule_and_recentring():
    bias = torch.zeros(3)
    update_router_bias(bias, torch.tensor([10.0, 2.0, 6.0]), rate=0.1)  # mean 6
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0]))
    bias = torch.tensor([1.0, 1.0, 1.0, 1.0])
    update_router_bias(bias, torch.tensor([1.0, 1.0, 1.0, 5.0]), rate=0.5, recenter=True)  # mean 2
    # before re-centring: [1.5, 1.5, 1.5, 0.5]; mean 1.25
    torch.testing.assert_close(bias, torch.tensor([0.25, 0.25, 0.25, -0.75]))


def test_bias_update_moves_load_toward_uniform():
    """Toy problem: a router that sends most tokens to two experts; 300 sign-rule steps fix it."""
    torch.manual_seed(0)
    E = 8
    router = build_router(16, MoEConfig(router="sigmoid", num_experts=E, top_k=2, bias_update_rate=0.01))
    with torch.no_grad():
        router.weight[:2] += 0.1  # experts 0 and 1 are preferred by everyone...
    x = torch.randn(2048, 16).abs()  # ...for these all-positive inputs
    max_vio = []
    for _ in range(300):
        counts = torch.bincount(router(x).expert_ids_TK.flatten(), minlength=E)
        max_vio.append(load_metrics(counts)["max_vio"])
        update_router_bias(router.bias, counts, rate=0.01)
    assert max_vio[0] > 2.0
    assert max(max_vio[-20:]) < 0.25
    assert router.bias[:2].mean() < router.bias[2:].mean() - 0.1  # the favoured experts were pushed down


def test_layer_counts_load_in_training_and_updates_only_when_asked():
    layer = MoELayer(16, MoEConfig(router="sigmoid", num_experts=4, top_k=2, bias_update_rate=0.05))
    x = torch.randn(2, 32, 16)
    layer.eval()
    layer(x)
    assert layer.load_since_update.sum() == 0  # evaluation does not count
    layer.train()
    _, info = layer(x)
    _, info2 = layer(x)
    torch.testing.assert_close(layer.load_since_update,
                               (info.tokens_per_expert + info2.tokens_per_expert).float())
    assert torch.all(layer.router.bias == 0)  # forward never touches the bias
    load = layer.load_since_update.clone()
    layer.finish_step()
    expected = 0.05 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.bias, expected)
    assert layer.load_since_update.sum() == 0


def test_bias_update_proportional_rule_moves_by_the_relative_violation():
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6: violations e = [-4, 4, 0, 0]
    bias = torch.tensor([0.5, 0.0, 0.0, -0.5])
    update_router_bias(bias, load, rate=0.3, rule="proportional")
    expected = torch.tensor([0.5, 0.0, 0.0, -0.5]) + 0.3 * torch.tensor([-4.0, 4.0, 0.0, 0.0]) / 6.0
    torch.testing.assert_close(bias, expected)
    # the same relative imbalance at 100x the tokens moves the bias by the same amount
    bias_big = torch.tensor([0.5, 0.0, 0.0, -0.5])
    update_router_bias(bias_big, 100 * load, rate=0.3, rule="proportional")
    torch.testing.assert_close(bias_big, expected)
    # recentring applies after the proportional step too
    bias = torch.zeros(4)
    update_router_bias(bias, load, rate=0.3, rule="proportional", recenter=True)
    torch.testing.assert_close(bias, 0.3 * torch.tensor([-4.0, 4.0, 0.0, 0.0]) / 6.0)  # already mean zero


def test_bias_update_sign_rule_is_the_default_and_unchanged():
    load = torch.tensor([10.0, 2.0, 6.0])
    default, sign = torch.zeros(3), torch.zeros(3)
    update_router_bias(default, load, rate=0.1)
    update_router_bias(sign, load, rate=0.1, rule="sign")
    torch.testing.assert_close(default, torch.tensor([-0.1, 0.1, 0.0]))
    assert torch.equal(default, sign)


def test_bias_update_proportional_with_no_load_is_zero_not_nan_and_unknown_rules_are_refused():
    bias = torch.ones(3)
    update_router_bias(bias, torch.zeros(3), rate=0.1, rule="proportional")
    assert torch.equal(bias, torch.ones(3))
    with pytest.raises(ValueError, match=r"^bias_update_rule='linear' is invalid: allowed values are sign, prop"):
        update_router_bias(bias, torch.ones(3), rate=0.1, rule="linear")


def test_layer_finish_step_uses_the_configured_bias_update_rule():
    cfg = MoEConfig(router="sigmoid", num_experts=4, top_k=2, bias_update_rate=0.05, bias_update_rule="proportional")
    layer = MoELayer(16, cfg).train()
    layer(torch.randn(2, 32, 16))
    load = layer.load_since_update.clone()
    assert load.sum() == 2 * 32 * 2 and (load != load.mean()).any()  # an imbalance to correct
    layer.finish_step()
    torch.testing.assert_close(layer.router.bias, 0.05 * (load.mean() - load) / load.mean())
    assert layer.load_since_update.sum() == 0
