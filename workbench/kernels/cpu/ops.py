"""The fused CPU kernels as autograd ops, one Python function each.

``csrc/swiglu_experts_cpu.cpp`` cuts the rows (sorted by expert) into one equal range per
intra-op thread, and each thread runs the whole expert FFN (forward: three GEMMs and the
SwiGLU; backward: six GEMMs) on its part of every expert, with single-threaded GEMMs. On a
few CPU cores that beats one grouped GEMM per weight matrix, whose small per-expert products
are split across every thread, and keeps each expert's activations in cache between its GEMMs
(see the layer benchmark in the README for measured figures).

``csrc/routing_cpu.cpp`` does the per-token work around the experts in one pass each: the
softmax top-k router (gate, softmax, selection and gates, forward and backward), the counting
sort of the token-expert pairs, the Switch auxiliary loss, and the values of the balancing
losses that are only reported. At the workbench's sizes (thousands of tokens, 8 experts) the
dozens of small ATen ops these replace cost more in dispatch than in arithmetic; together they
were about a tenth of a ``tiny`` training step.

The hot loops (the gate's products, the softmax's exp, the SwiGLU's element-wise steps) have
AVX2 + FMA versions, compiled per function and chosen at run time (``csrc/vec_math.h``), so one
build runs on any x86-64 CPU and elsewhere the plain loops or ATen ops run.

These ops assume the kernels are built and their inputs fit (``workbench.kernels.cpu.modules``
checks that before calling them). Each computes a function of the readable ``workbench.moe``
code, named in its docstring, and is tested against it.

Shape legend: T tokens, N routed rows sorted by expert, D model dim, H expert hidden, E experts,
K experts per token.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from workbench.kernels.cpu.build import require_kernel
from workbench.moe.balance import BALANCE_LOSSES
from workbench.moe.permutation import combine, in_pair_order, sum_rows_per_token
from workbench.moe.types import RouterOutput, SortedPairs

# --- experts ---------------------------------------------------------------------------------


class _FusedSwiGLUExperts(torch.autograd.Function):
    """The experts on rows already sorted by expert: ``out = SwiGLU_e(x)`` row by row."""

    @staticmethod
    def forward(ctx, x_ND, w1_EDH, w3_EDH, w2_EHD, counts):
        out_ND, gate_NH, up_NH = require_kernel().swiglu_experts_forward(x_ND, None, w1_EDH, w3_EDH, w2_EHD, counts)
        ctx.save_for_backward(x_ND, gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD)
        ctx.counts = counts
        return out_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND):
        x_ND, gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD = ctx.saved_tensors
        grad_x_ND, _, *grad_weights = require_kernel().swiglu_experts_backward(
            grad_ND.contiguous(), x_ND, None, None, None, gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD, ctx.counts)
        return grad_x_ND, *grad_weights, None


def fused_swiglu_experts(x_ND: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                         counts: list[int]) -> torch.Tensor:
    """``out[rows of e] = (silu(x_e w1[e]) * (x_e w3[e])) w2[e]``, rows sorted by expert, ``counts[e]`` each."""
    tensors = [t.contiguous() for t in (x_ND, w1_EDH, w3_EDH, w2_EHD)]
    return _FusedSwiGLUExperts.apply(*tensors, [int(c) for c in counts])


class _FusedSortedExperts(torch.autograd.Function):
    """Permute, experts, un-permute and combine in one op, with the fused CPU kernel.

    Row n of the experts' input is token ``sorted_to_pair[n] // K``; the kernel gathers each
    thread's rows itself, and its backward gathers the output gradient, weights it and computes
    the routing weights' gradient in the same pass (what ``permutation.permute`` and
    ``permutation.unpermute_combine`` do in separate steps), so no sorted copy of x or of the gradient is
    written to memory. Every pair must be a real assignment (no slot mask).
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1_EDH, w3_EDH, w2_EHD, sorted_to_pair_N, pair_to_sorted_N, counts):
        token_of_row_N = sorted_to_pair_N // weights_TK.shape[1]
        out_sorted_ND, gate_NH, up_NH = require_kernel().swiglu_experts_forward(
            x_TD, token_of_row_N, w1_EDH, w3_EDH, w2_EHD, counts)
        ctx.save_for_backward(x_TD, weights_TK, sorted_to_pair_N, pair_to_sorted_N, token_of_row_N, out_sorted_ND,
                              gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD)
        ctx.counts = counts
        return combine(out_sorted_ND, pair_to_sorted_N.view_as(weights_TK), weights_TK)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        (x_TD, weights_TK, sorted_to_pair_N, pair_to_sorted_N, token_of_row_N, out_sorted_ND, gate_NH, up_NH,
         w1_EDH, w3_EDH, w2_EHD) = ctx.saved_tensors
        weight_of_row_N = weights_TK.flatten().index_select(0, sorted_to_pair_N).to(x_TD.dtype)
        grad_rows_ND, grad_weight_of_row_N, *grad_expert_weights = require_kernel().swiglu_experts_backward(
            grad_TD.contiguous(), x_TD, token_of_row_N, weight_of_row_N, out_sorted_ND, gate_NH, up_NH,
            w1_EDH, w3_EDH, w2_EHD, ctx.counts)
        grad_x_TD = sum_rows_per_token(grad_rows_ND, pair_to_sorted_N, weights_TK.shape[1])
        grad_weights_TK = (in_pair_order(grad_weight_of_row_N, sorted_to_pair_N)
                           .view_as(weights_TK).to(weights_TK.dtype))
        return grad_x_TD, grad_weights_TK, *grad_expert_weights, None, None, None


def fused_sorted_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts: torch.nn.Module,
                         pairs: SortedPairs) -> torch.Tensor:
    """(T, D): ``y_t = sum_k w_tk * expert_{e_tk}(x_t)`` in one op, rows sorted as ``pairs`` says."""
    return _FusedSortedExperts.apply(x_TD.contiguous(), weights_TK.contiguous(), experts.w1.contiguous(),
                                     experts.w3.contiguous(), experts.w2.contiguous(), pairs.sorted_to_pair_N,
                                     pairs.pair_to_sorted_N, pairs.counts)


# --- routing and balancing --------------------------------------------------------------


class _FusedSoftmaxTopK(torch.autograd.Function):
    """``logits = x W^T``, ``probs = softmax(logits)``, top-k of ``probs + bias``, gates: one op.

    The same function as ``Router.gate_logits`` + ``SoftmaxTopKRouter.route`` + ``Router.gates``;
    the backward takes whichever of the logits', probabilities' and gates' gradients arrived
    (the balancing losses read the first two, the dispatch the third) in one pass per token.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_ED, bias_E, k, normalize):
        logits_TE, probs_TE, ids_TK, gates_TK = require_kernel().softmax_topk_forward(
            x_TD, weight_ED, bias_E, k, normalize)
        ctx.save_for_backward(x_TD, weight_ED, probs_TE, ids_TK, gates_TK)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # an output no loss read passes None, not a tensor of zeros
        return logits_TE, probs_TE, ids_TK, gates_TK

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits_TE, grad_probs_TE, _grad_ids, grad_gates_TK):
        x_TD, weight_ED, probs_TE, ids_TK, gates_TK = ctx.saved_tensors
        grad_x_TD, grad_weight_ED = require_kernel().softmax_topk_backward(
            grad_logits_TE, grad_probs_TE, grad_gates_TK, x_TD, weight_ED, probs_TE, ids_TK, gates_TK, ctx.normalize)
        return grad_x_TD, grad_weight_ED, None, None, None


def fused_softmax_topk(x32_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, k: int,
                       normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (T, E), probs (T, E), expert ids (T, K), gates (T, K)) of softmax top-k routing:
    selection by ``probs + bias``, gates the selected probabilities (renormalised when ``normalize``).
    The K ids of a token come in descending order of ``probs + bias``."""
    return _FusedSoftmaxTopK.apply(x32_TD.contiguous(), weight_ED.contiguous(), bias_E, k, normalize)


def sort_pairs_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> SortedPairs:
    """``permutation.sort_pairs_by_expert`` for routing without padding slots, as one counting sort."""
    T, K = expert_ids_TK.shape
    sorted_to_pair_N, pair_to_sorted_N, tokens_per_expert = require_kernel().sort_pairs_by_expert(
        expert_ids_TK.contiguous(), num_experts)
    counts = tokens_per_expert.tolist()
    return SortedPairs(sorted_to_pair_N, pair_to_sorted_N, tokens_per_expert, counts, T * K, K)


def balance_loss_values(routing: RouterOutput, num_sequences: int) -> dict[str, torch.Tensor]:
    """The values of ``balance.switch_aux_loss`` (this micro-batch), ``balance.sequence_aux_loss`` and
    ``balance.router_z_loss``, in one pass and without a graph: for the losses that are only reported."""
    values = require_kernel().balance_loss_values(routing.scores_TE.detach().contiguous(),
                                                  routing.expert_ids_TK.contiguous(),
                                                  routing.logits_TE.detach().contiguous(), num_sequences)
    return dict(zip(BALANCE_LOSSES, values.unbind(), strict=True))  # the kernel keeps the table's order


class _FusedSwitchAux(torch.autograd.Function):
    """``balance.switch_aux_loss`` without masks: one pass forward, one backward (closed form)."""

    @staticmethod
    def forward(ctx, scores_TE, expert_ids_TK):
        loss, f_E = require_kernel().switch_aux_forward(scores_TE, expert_ids_TK)
        ctx.save_for_backward(scores_TE, f_E)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        scores_TE, f_E = ctx.saved_tensors
        return require_kernel().switch_aux_backward(grad, scores_TE, f_E), None


def fused_switch_aux_loss(scores_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """``balance.switch_aux_loss(scores_TE, expert_ids_TK)`` (no masks) with the fused CPU kernel."""
    return _FusedSwitchAux.apply(scores_TE.contiguous(), expert_ids_TK.contiguous())
