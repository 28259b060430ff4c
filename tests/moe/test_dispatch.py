"""Every dispatch computes the same function as the loop reference, forward and gradients (fp32).

Tolerances (max abs error): outputs 1e-5, gradients 1e-4. Weights are scaled so that outputs
are O(1); with the model's 0.02 init every error would be trivially small. The ``expert_kernel``
fixture (``conftest.py``) runs a test with the fused CPU kernels (converted modules, the fused
sorted dispatch) and without them.
"""

from __future__ import annotations

import pytest
import torch

from tests.moe.helpers import random_masked_routing, random_routing
from workbench.config import MoEConfig
from workbench.moe import DISPATCHES, MoELayer, RouterOutput, SwiGLUExperts, SwiGLUMLP
from workbench.moe.dispatch import capacity_dispatch, expert_capacity, loop_dispatch
from workbench.moe.experts import _grouped_mm_ok, grouped_matmul

OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def make_experts(E: int, D: int, H: int) -> SwiGLUExperts:
    experts = SwiGLUExperts(E, D, H)
    experts.reset_parameters(std=D**-0.5, out_std=H**-0.5)
    return experts


def run(dispatch, x, routing, experts, **kw):
    x = x.clone().requires_grad_()
    y, stats = dispatch(x, routing, experts, **kw)
    params = [x, routing.weights_TK, experts.w1, experts.w2, experts.w3]
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return y, stats, torch.autograd.grad(y, params, grad_out)


# (D, H): multiples of 4 take F.grouped_mm; odd sizes take the loop fallback of grouped_matmul.
@pytest.mark.parametrize("D,H", [(32, 64), (20, 30)])
@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (6, 3), (1, 1)])
def test_dispatches_agree_with_loop_reference(D, H, E, K, expert_kernel):
    T = 96
    experts = expert_kernel.convert(make_experts(E, D, H))
    x = torch.randn(T, D)
    routing = random_routing(T, E, K, requires_grad=True)
    y_ref, stats_ref, g_ref = run(loop_dispatch, x, routing, experts)
    assert y_ref.abs().max() > 0.1  # the comparison is not between near-zero tensors

    no_drop_factor = E / K  # C = T: no expert can overflow
    for name, kw in [("sorted", {}), ("capacity", {"capacity_factor": no_drop_factor})]:
        y, stats, g = run(expert_kernel.dispatch(name), x, routing, experts, **kw)
        assert (y - y_ref).abs().max() <= OUT_TOL, name
        for a, b, what in zip(g, g_ref, ["x", "weights", "w1", "w2", "w3"], strict=True):
            assert (a - b).abs().max() <= GRAD_TOL, f"{name}: gradient of {what}"
        assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
        assert stats.dropped_assignments.item() == 0 and stats.dropped_tokens.item() == 0


def test_grouped_path_is_exercised_for_aligned_shapes():
    a, b = torch.randn(10, 32), torch.randn(4, 32, 64)
    assert _grouped_mm_ok(a, b) == hasattr(torch.nn.functional, "grouped_mm")
    assert not _grouped_mm_ok(torch.randn(10, 20), torch.randn(4, 20, 30))


def test_grouped_matmul_matches_per_group_products_with_empty_groups():
    counts = [3, 0, 5, 0, 4]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(len(counts), 16, 8, requires_grad=True)
    out = grouped_matmul(x, w, counts)
    ref = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))])
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w), g)
    assert (out - ref).abs().max() <= OUT_TOL
    assert (gx - gx_ref).abs().max() <= GRAD_TOL and (gw - gw_ref).abs().max() <= GRAD_TOL
    assert gw[1].abs().max() == 0 and gw[3].abs().max() == 0


def test_layer_dispatches_agree_end_to_end_with_shared_expert_and_router_gradients(expert_kernel):
    """Through MoELayer: router weights get the same gradient whichever dispatch runs."""
    results = {}
    for name in DISPATCHES:
        torch.manual_seed(3)
        cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=32, dispatch=name, capacity_factor=4.0,
                        num_shared_experts=1, shared_expert_gate=True)
        layer = expert_kernel.convert(MoELayer(16, cfg))
        layer.experts.reset_parameters(std=0.25, out_std=0.2)
        x = torch.randn(2, 24, 16, requires_grad=True)
        y, info = layer(x)
        loss = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum() \
            + info.losses["aux_loss"] + info.losses["z_loss"]
        loss.backward()
        results[name] = (y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()})
    y_ref, gx_ref, gp_ref = results["loop"]
    for name in ("sorted", "capacity"):
        y, gx, gp = results[name]
        assert (y - y_ref).abs().max() <= OUT_TOL
        assert (gx - gx_ref).abs().max() <= GRAD_TOL
        for n in gp_ref:
            assert (gp[n] - gp_ref[n]).abs().max() <= GRAD_TOL, n


def _routing(ids, weights) -> RouterOutput:
    ids, weights = torch.tensor(ids), torch.tensor(weights, dtype=torch.float32)
    E = int(ids.max()) + 1
    scores = torch.full((ids.shape[0], E), 1.0 / E)
    return RouterOutput(ids, weights, scores, scores.log())


def test_capacity_drops_exactly_by_position_first_choices_first():
    """3 tokens, 2 experts, top-2, capacity 2.

    Claim order (GShard): first choices of t0, t1, t2, then second choices of t0, t1, t2.
    Expert 0: t0 (1st), t1 (1st), t2 (2nd) -> t2's second choice is dropped.
    Expert 1: t2 (1st), t0 (2nd), t1 (2nd) -> t1's second choice is dropped.
    """
    experts = make_experts(2, 8, 16)
    x = torch.randn(3, 8)
    routing = _routing([[0, 1], [0, 1], [1, 0]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    assert expert_capacity(3, 2, 2, 2 / 3) == 2
    y, stats = capacity_dispatch(x, routing, experts, capacity_factor=2 / 3, drop_policy="position")
    e0, e1 = (lambda v: experts.forward_one(0, v)), (lambda v: experts.forward_one(1, v))
    expected = torch.stack([
        0.6 * e0(x[0]) + 0.4 * e1(x[0]),
        0.7 * e0(x[1]),  # second choice (expert 1) dropped
        0.8 * e1(x[2]),  # second choice (expert 0) dropped
    ])
    torch.testing.assert_close(y, expected, atol=OUT_TOL, rtol=0)
    assert stats.capacity == 2
    assert stats.dropped_assignments.item() == 2
    assert stats.dropped_tokens.item() == 0
    assert stats.tokens_per_expert.tolist() == [3, 3]
    assert stats.kept_per_expert.tolist() == [2, 2]


def test_capacity_drops_whole_tokens_and_score_priority_keeps_the_confident():
    """4 tokens all to expert 0, capacity 2: by position t0, t1 keep their slot; by score the
    two highest gates (t1: 0.9, t3: 0.7) do. A dropped token's MoE output is exactly zero."""
    experts = make_experts(2, 8, 16)
    x = torch.randn(4, 8)
    routing = _routing([[0], [0], [0], [0]], [[0.1], [0.9], [0.5], [0.7]])
    ref = [w * experts.forward_one(0, x[t]) for t, w in enumerate([0.1, 0.9, 0.5, 0.7])]

    y, stats = capacity_dispatch(x, routing, experts, capacity_factor=1.0, drop_policy="position")
    torch.testing.assert_close(y, torch.stack([ref[0], ref[1], torch.zeros(8), torch.zeros(8)]),
                               atol=OUT_TOL, rtol=0)
    assert stats.dropped_tokens.item() == 2 and stats.dropped_assignments.item() == 2

    y, stats = capacity_dispatch(x, routing, experts, capacity_factor=1.0, drop_policy="score")
    torch.testing.assert_close(y, torch.stack([torch.zeros(8), ref[1], torch.zeros(8), ref[3]]),
                               atol=OUT_TOL, rtol=0)
    assert stats.kept_per_expert.tolist() == [2, 0]


def test_dropped_tokens_keep_the_residual_in_the_model_block():
    """With capacity for almost nobody, an MoE block's FFN output is (nearly) zero: x passes through."""
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=16, dispatch="capacity", capacity_factor=0.01,
                    normalize_topk=False)
    layer = MoELayer(8, cfg)
    x = torch.randn(1, 200, 8)
    y, info = layer(x)
    C = info.stats.capacity
    assert C == 1
    kept = info.stats.kept_per_expert.sum().item()
    assert kept <= 4 and info.stats.dropped_assignments.item() == 200 - kept
    assert (y.abs().sum(dim=-1) > 0).sum().item() == kept  # only the kept tokens got an output


def test_one_expert_top1_equals_dense_swiglu():
    D, H = 16, 40
    layer = MoELayer(D, MoEConfig(num_experts=1, top_k=1, expert_hidden=H, aux_loss_weight=0.0))
    dense = SwiGLUMLP(D, H)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1[0].t())
        dense.w3.weight.copy_(layer.experts.w3[0].t())
        dense.w2.weight.copy_(layer.experts.w2[0].t())
    x = torch.randn(3, 7, D)
    y, info = layer(x)
    assert torch.all(info.router_output.weights_TK == 1.0)
    torch.testing.assert_close(y, dense(x), atol=OUT_TOL, rtol=0)


def test_dispatch_under_bf16_autocast_keeps_routing_in_fp32():
    layer = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_hidden=64))
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = layer(x.bfloat16())
    assert info.router_output.logits_TE.dtype == torch.float32
    assert info.router_output.weights_TK.dtype == torch.float32
    assert torch.isfinite(y.float()).all()


# --- masked routing (expert choice): padding slots are ignored everywhere --------------------


@pytest.mark.parametrize("D,H", [(32, 64), (20, 30)])
@pytest.mark.parametrize("E,K", [(8, 3), (4, 4), (6, 1)])
def test_dispatches_agree_with_loop_reference_under_a_slot_mask(D, H, E, K, expert_kernel):
    T = 96
    experts = expert_kernel.convert(make_experts(E, D, H))
    x = torch.randn(T, D)
    routing = random_masked_routing(T, E, K, requires_grad=True)
    mask = routing.mask_TK
    y_ref, stats_ref, g_ref = run(loop_dispatch, x, routing, experts)
    assert y_ref.abs().max() > 0.1
    # padding slots contribute nothing: the reference equals a sum over the real slots only
    explicit = torch.zeros(T, D)
    for t, k in mask.nonzero().tolist():
        e = routing.expert_ids_TK[t, k].item()
        explicit[t] += routing.weights_TK[t, k].detach() * experts.forward_one(e, x[t]).detach()
    assert (y_ref - explicit).abs().max() <= OUT_TOL
    assert y_ref[0].abs().max() == 0  # the token with no real slot gets no expert output
    assert g_ref[1][~mask].abs().max() == 0  # padding weights get no gradient
    real = torch.bincount(routing.expert_ids_TK[mask], minlength=E)
    assert torch.equal(stats_ref.tokens_per_expert, real)

    no_drop_factor = float(E)  # C = number of real pairs: no expert can overflow
    for name, kw in [("sorted", {}), ("capacity", {"capacity_factor": no_drop_factor})]:
        y, stats, g = run(expert_kernel.dispatch(name), x, routing, experts, **kw)
        assert (y - y_ref).abs().max() <= OUT_TOL, name
        for a, b, what in zip(g, g_ref, ["x", "weights", "w1", "w2", "w3"], strict=True):
            assert (a - b).abs().max() <= GRAD_TOL, f"{name}: gradient of {what}"
        assert torch.equal(stats.tokens_per_expert, real), name
        assert stats.dropped_assignments.item() == 0 and stats.dropped_tokens.item() == 0


def test_capacity_under_a_slot_mask_counts_only_real_pairs():
    """2 experts; t0 -> e0, t1 -> e0, t2 -> e0 (+ a padding slot on e1 each).
    Real pairs: 3, so capacity_factor 1 gives C = ceil(3 / 2) = 2: t2 is dropped, and padding
    neither claims e1's slots nor counts as dropped."""
    experts = make_experts(2, 8, 16)
    x = torch.randn(3, 8)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    mask = torch.tensor([[True, False]] * 3)
    weights = torch.tensor([[0.5, 0.9], [0.6, 0.9], [0.7, 0.9]])
    scores = torch.full((3, 2), 0.5)
    routing = RouterOutput(ids, weights, scores, scores.log(), mask)
    y, stats = capacity_dispatch(x, routing, experts, capacity_factor=1.0)
    assert stats.capacity == 2
    assert stats.tokens_per_expert.tolist() == [3, 0] and stats.kept_per_expert.tolist() == [2, 0]
    assert stats.dropped_assignments.item() == 1 and stats.dropped_tokens.item() == 1
    expected = torch.stack([0.5 * experts.forward_one(0, x[0]), 0.6 * experts.forward_one(0, x[1]), torch.zeros(8)])
    torch.testing.assert_close(y, expected, atol=OUT_TOL, rtol=0)


@pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")
def test_layer_dispatches_agree_end_to_end_with_expert_choice(expert_kernel):
    """Expert choice through MoELayer: every dispatch gives the same output and gradients
    (router, experts, shared expert, input), with padded slots in play."""
    results = {}
    for name in DISPATCHES:
        torch.manual_seed(4)
        cfg = MoEConfig(router="expert_choice", num_experts=8, top_k=2, expert_hidden=32, dispatch=name,
                        capacity_factor=8.0, num_shared_experts=1, z_loss_weight=0.1)
        layer = expert_kernel.convert(MoELayer(16, cfg))
        layer.experts.reset_parameters(std=0.25, out_std=0.2)
        x = torch.randn(2, 24, 16, requires_grad=True)
        y, info = layer(x)
        assert info.router_output.mask_TK is not None and not info.router_output.mask_TK.all()
        loss = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum() + info.weighted_loss
        loss.backward()
        results[name] = (y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, info)
    y_ref, gx_ref, gp_ref, info_ref = results["loop"]
    assert gp_ref["router.weight"].abs().sum() > 0
    for name in ("sorted", "capacity"):
        y, gx, gp, info = results[name]
        assert info.stats.dropped_assignments.item() == 0
        assert (y - y_ref).abs().max() <= OUT_TOL
        assert (gx - gx_ref).abs().max() <= GRAD_TOL
        for n in gp_ref:
            assert (gp[n] - gp_ref[n]).abs().max() <= GRAD_TOL, n
