"""The fused CPU routing kernels compute the readable reference's functions, whatever the threads,
with their AVX2 loops and with the plain ones (the `simd` fixture).

Each test runs the same call on a module converted to the kernels (``workbench.kernels.cpu.convert``,
on a copy) and on the readable module, or calls a kernel op beside the function it replaces: the
softmax top-k router (gate, softmax, selection, gates, and the backward of all of them), the
counting sort of the token-expert pairs, the Switch auxiliary loss with its gradient, and the
values of the losses that are only reported. Tolerances: 1e-5 relative for values, 1e-4 for
gradients (fp32); selections must be identical.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from tests.kernels.conftest import needs_kernel
from workbench.config import preset
from workbench.kernels.cpu import convert, ops
from workbench.kernels.cpu.modules import FusedSoftmaxTopKRouter, fp32_on_cpu
from workbench.moe import balance
from workbench.moe.layer import MoELayer
from workbench.moe.permutation import sort_pairs_by_expert
from workbench.moe.routers import RouterOutput, build_router

pytestmark = needs_kernel


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def both_ways(module, fn):
    """(fn(a converted copy of module), fn(module)): with the fused kernels, then without them."""
    fused = convert(copy.deepcopy(module))
    assert type(fused) is not type(module), "nothing was converted"
    return fn(fused), fn(module)


def in_expert_order(ids_TK: torch.Tensor, values_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token's K slots sorted by expert id: the kernel and torch.topk may list them in other orders."""
    order = ids_TK.argsort(dim=1)
    return ids_TK.gather(1, order), values_TK.gather(1, order)


ROUTER_CASES = {
    "softmax top-2, renormalised": dict(router="softmax_topk", top_k=2),
    "softmax top-3, raw probabilities, selection bias": dict(router="softmax_topk", top_k=3, normalize_topk=False,
                                                             bias_update_rate=0.01),
    "switch (top-1), route scale": dict(router="switch", top_k=1, route_scale=2.5),
    "softmax top-2 of 16 experts, odd width": dict(router="softmax_topk", top_k=2, num_experts=16),
}


@pytest.mark.parametrize("case", ROUTER_CASES, ids=list(ROUTER_CASES))
def test_fused_router_equals_the_reference_forward_and_backward(case, threads, simd):
    fields = ROUTER_CASES[case]
    D = 37 if "odd" in case else 64
    cfg = replace(preset("tiny").moe, **fields)
    torch.manual_seed(0)
    router = build_router(D, cfg).train()
    if router.bias is not None:
        router.bias.copy_(torch.randn(cfg.num_experts) * 0.05)  # a bias that changes selections
    x = torch.randn(1500, D) * 2
    K, E = cfg.top_k, cfg.num_experts
    grads = [torch.randn(1500, E), torch.randn(1500, K), torch.randn(1500, E)]  # probs, gates, logits

    def run(router):
        x_leaf = x.clone().requires_grad_()
        out = router(x_leaf)
        ids, weights = in_expert_order(out.expert_ids_TK, out.weights_TK)
        loss = (out.scores_TE * grads[0]).sum() + (weights * grads[1]).sum() + (out.logits_TE * grads[2]).sum()
        loss.backward()
        return ids, weights, out.scores_TE, out.logits_TE, x_leaf.grad, router.weight.grad.clone()

    fused, reference = both_ways(router, run)
    assert torch.equal(fused[0], reference[0]), "the fused router selected other experts"
    for name, a, b, tol in zip(["gates", "scores", "logits", "grad x", "grad weight"], fused[1:], reference[1:],
                               [1e-5, 1e-5, 1e-5, 1e-4, 1e-4], strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


def test_fused_router_passes_gradient_only_to_the_outputs_used(threads):
    """An output no loss reads sends no gradient (the kernel gets None, not zeros): gates alone,
    then probabilities alone."""
    cfg = preset("tiny").moe
    router = build_router(32, cfg).train()
    x = torch.randn(300, 32)
    for pick in (lambda o: o.weights_TK.square().sum(), lambda o: (o.scores_TE ** 3).sum()):
        def run(router, pick=pick):
            x_leaf = x.clone().requires_grad_()
            (gx,) = torch.autograd.grad(pick(router(x_leaf)), [x_leaf])
            return gx
        fused, reference = both_ways(router, run)
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_experts", [8, 16, 12], ids=["8 experts", "16 experts", "12 experts (scalar path)"])
def test_router_softmax_holds_over_a_wide_range_of_logits(num_experts, simd):
    """Logit spreads from 1e-3 to hundreds (where e^x underflows for all but the top experts). The
    kernel's softmax (a vectorised exp where E is a multiple of 8, else the scalar one) and z-loss
    value equal torch's on the kernel's own logits, which equal the reference's up to fp32 rounding
    of the gate's sums. Selections agree wherever the K-th choice is decided: a normal float clearly
    above the next (below 2^-126 the vectorised exp returns 0 where torch keeps a few bits of a
    subnormal, so experts that far behind tie, and either may be picked)."""
    torch.manual_seed(4)
    K = 2
    cfg = replace(preset("tiny").moe, num_experts=num_experts, top_k=K)
    router = build_router(32, cfg).train()
    x = torch.randn(600, 32) * torch.logspace(-3, 2.5, 600).unsqueeze(1)
    with torch.no_grad():
        fused, reference = both_ways(router, lambda r: r(x))
    assert (reference.logits_TE.max(1).values - reference.logits_TE.min(1).values).max() > 200
    # a dot product's rounding error scales with sum_d |x_d w_d|, not with the (cancelling) result
    rounding_scale_TE = x.abs() @ router.weight.detach().abs().t()
    assert ((fused.logits_TE - reference.logits_TE).abs() <= 1e-5 * rounding_scale_TE).all()
    torch.testing.assert_close(fused.scores_TE, fused.logits_TE.softmax(dim=1), rtol=1e-5, atol=1e-30)
    z_fused = ops.balance_loss_values(fused, 6)["z_loss"]
    torch.testing.assert_close(z_fused, balance.router_z_loss(fused.logits_TE), rtol=1e-5, atol=0)
    ranked = reference.scores_TE.sort(dim=1, descending=True).values
    kth, next_best = ranked[:, K - 1], ranked[:, K]
    decided = (kth > torch.finfo(torch.float32).tiny) & (kth - next_best > 1e-3 * kth)
    assert decided.float().mean() > 0.8
    ids_fused, ids_reference = (in_expert_order(out.expert_ids_TK, out.weights_TK)[0] for out in (fused, reference))
    assert torch.equal(ids_fused[decided], ids_reference[decided])


def test_the_fused_router_runs_only_where_its_kernel_fits_and_the_readable_router_elsewhere():
    """fp32 CPU input and gate: the kernel; a bf16 gate or fp64 input: the readable parent's code."""
    router = build_router(16, preset("tiny").moe)
    x = torch.randn(10, 16)
    assert fp32_on_cpu(x, router.weight)
    assert not fp32_on_cpu(x, router.weight.bfloat16())
    assert not fp32_on_cpu(x.double(), router.weight)
    fused = convert(copy.deepcopy(router))
    assert type(fused) is FusedSoftmaxTopKRouter
    fused.double(), router.double()
    out_fused, out_ref = fused(x.double()), router(x.double())
    assert out_fused.logits_TE.dtype == torch.float32  # routing runs in fp32 (the readable rule)
    for a, b in zip((out_fused.expert_ids_TK, out_fused.weights_TK, out_fused.logits_TE),
                    (out_ref.expert_ids_TK, out_ref.weights_TK, out_ref.logits_TE), strict=True):
        assert torch.equal(a, b)


def test_counting_sort_equals_the_stable_argsort():
    torch.manual_seed(1)
    E = 7
    ids_TK = torch.randint(0, E, (513, 3))
    ids_TK[:, 0] = 2  # a crowded expert, and (with E = 7 and few draws elsewhere) maybe empty ones
    routing = RouterOutput(ids_TK, torch.rand(513, 3), torch.rand(513, E), torch.randn(513, E))
    fused = ops.sort_pairs_by_expert(ids_TK, E)
    reference = sort_pairs_by_expert(routing, E)
    assert torch.equal(fused.sorted_to_pair_N, reference.sorted_to_pair_N)
    assert torch.equal(fused.pair_to_sorted_N, reference.pair_to_sorted_N)
    assert torch.equal(fused.tokens_per_expert, reference.tokens_per_expert)
    assert fused.counts == reference.counts and fused.num_valid == reference.num_valid == 513 * 3


def test_counting_sort_refuses_an_out_of_range_expert():
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        ops.sort_pairs_by_expert(torch.tensor([[0, 9]]), 8)


@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
def test_fused_switch_aux_loss_equals_the_reference_value_and_gradient(scores, simd):
    torch.manual_seed(2)
    logits = torch.randn(777, 8) * 2
    s = (logits.softmax(-1) if scores == "softmax" else logits.sigmoid()).requires_grad_()
    ids = torch.randint(0, 8, (777, 2))

    def run(aux_loss):
        s.grad = None
        loss = aux_loss(s, ids)
        (0.37 * loss).backward()
        return loss.detach(), s.grad.clone()

    (loss_f, grad_f), (loss_r, grad_r) = run(ops.fused_switch_aux_loss), run(balance.switch_aux_loss)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_f, grad_r, rtol=1e-4, atol=1e-4 * grad_r.abs().max().item())


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid"])
def test_reported_loss_values_equal_the_reference_functions(router, simd):
    torch.manual_seed(3)
    cfg = replace(preset("tiny").moe, router=router)
    B, S = 6, 40
    out = build_router(32, cfg)(torch.randn(B * S, 32) * 3)
    values = ops.balance_loss_values(out, B)
    reference = {
        "aux_loss": balance.switch_aux_loss(out.scores_TE, out.expert_ids_TK),
        "seq_aux_loss": balance.sequence_aux_loss(out.scores_TE.view(B, S, -1), out.expert_ids_TK.view(B, S, -1)),
        "z_loss": balance.router_z_loss(out.logits_TE),
    }
    assert values.keys() == reference.keys()
    for name, value in values.items():
        torch.testing.assert_close(value, reference[name].detach(), rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("weights", [dict(), dict(aux_loss_weight=0.0, seq_aux_loss_weight=0.1, z_loss_weight=1e-3),
                                     dict(aux_loss_scope="global_batch", aux_loss_weight=0.0, z_loss_weight=1e-3)],
                         ids=["aux weighted", "seq and z weighted", "global-batch aux reported"])
def test_the_layer_reports_and_weights_the_same_losses_with_and_without_kernels(weights):
    """Whichever losses carry weight, the layer's raw losses, weighted loss and their gradient agree.
    Two micro-batches: the second's global-batch aux counts both, so it differs from the Switch loss."""
    cfg = replace(preset("tiny").moe, **weights)
    torch.manual_seed(4)
    layer = MoELayer(32, cfg).train()
    x = torch.randn(2, 4, 50, 32)

    def run(layer):
        layer(x[0])
        _, info = layer(x[1])
        info.weighted_loss.backward()
        return {k: v.detach() for k, v in info.losses.items()}, info.weighted_loss.detach(), layer.router.weight.grad

    (losses_f, weighted_f, grad_f), (losses_r, weighted_r, grad_r) = both_ways(layer, run)
    assert list(losses_f) == list(losses_r) == ["aux_loss", "seq_aux_loss", "z_loss"]
    for name in losses_r:
        torch.testing.assert_close(losses_f[name], losses_r[name], rtol=1e-5, atol=0, msg=name)
    torch.testing.assert_close(weighted_f, weighted_r, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_f, grad_r, rtol=1e-4, atol=1e-4 * grad_r.abs().max().item())
