"""Token-expert pairs sorted by expert, and back: the permute and un-permute steps of a dispatch.

``SortedPairs`` is the plan (a stable sort of the pairs by expert); ``permute`` gathers each
pair's token row in sorted order and ``unpermute_combine`` takes the experts' sorted outputs back
to tokens, weighted and summed. Both have backward passes that gather instead of scattering into
zeros (a permutation has an inverse). The sorted dispatch runs them around the experts; the fused
CPU kernel (``workbench.kernels.cpu``) folds the same steps into its own op and shares the
helpers below. Expert parallelism puts its all-to-all between ``permute`` and the experts.

Shape legend: T tokens, D model dim, E experts, K experts per token, N = T*K token-expert pairs
(flattened row-major from (T, K), so pair n is token n // K), R rows of any buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.moe.types import RouterOutput, SortedPairs


def sort_pairs_by_expert(routing: RouterOutput, num_experts: int) -> SortedPairs:
    """Sort the (T*K) pairs by expert; padding pairs (``mask_TK`` False) go last, never computed."""
    T, K = routing.expert_ids_TK.shape
    expert_of_pair_N = routing.expert_ids_TK.flatten()
    if routing.mask_TK is not None:
        # padding pairs join a group E after every expert
        expert_of_pair_N = expert_of_pair_N.masked_fill(~routing.mask_TK.flatten(), num_experts)
    sorted_to_pair_N = expert_of_pair_N.argsort(stable=True)
    positions_N = torch.arange(T * K, device=sorted_to_pair_N.device)
    pair_to_sorted_N = torch.empty_like(sorted_to_pair_N).scatter_(0, sorted_to_pair_N, positions_N)
    tokens_per_expert = torch.bincount(expert_of_pair_N, minlength=num_experts)[:num_experts]
    counts = tokens_per_expert.tolist()
    return SortedPairs(sorted_to_pair_N, pair_to_sorted_N, tokens_per_expert, counts, sum(counts), K)


def combine(rows_RD: torch.Tensor, row_of_pair_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * rows[row_of_pair[t, k]]: gather each token's K expert outputs and
    weight them, fused in one pass by ``embedding_bag`` (bag t holds token t's K rows)."""
    return F.embedding_bag(row_of_pair_TK, rows_RD, per_sample_weights=weights_TK.to(rows_RD.dtype), mode="sum")


def sum_rows_per_token(rows_ND: torch.Tensor, pair_to_sorted_N: torch.Tensor, K: int) -> torch.Tensor:
    """(T, D): each token's K rows (pair t*K + k sits at row pair_to_sorted[t*K + k]) summed,
    gathered and added in one fused ``embedding_bag`` pass."""
    return F.embedding_bag(pair_to_sorted_N.view(-1, K), rows_ND, mode="sum")


def in_pair_order(sorted_N: torch.Tensor, sorted_to_pair_N: torch.Tensor) -> torch.Tensor:
    """Undo the sort of a per-pair value: ``out[sorted_to_pair[n]] = sorted[n]``."""
    return torch.empty_like(sorted_N).index_copy_(0, sorted_to_pair_N, sorted_N)


class _GatherPairs(torch.autograd.Function):
    """``x[sorted_to_pair[:n] // K]``: each valid pair's token row, in sorted order.

    Autograd's own backward of that gather scatters into zeros; a permutation has an inverse,
    so this one gathers instead: each pair's gradient by ``pair_to_sorted`` (padding pairs
    read a zero row), then the K copies of a token are summed.
    """

    @staticmethod
    def forward(ctx, x_TD, sorted_to_pair_N, pair_to_sorted_N, num_valid, K):
        ctx.save_for_backward(pair_to_sorted_N)
        ctx.K, ctx.pad = K, pair_to_sorted_N.numel() - num_valid
        return x_TD.index_select(0, sorted_to_pair_N[:num_valid] // K)

    @staticmethod
    def backward(ctx, grad_sorted_ND):
        (pair_to_sorted_N,) = ctx.saved_tensors
        if ctx.pad:
            grad_sorted_ND = torch.cat([grad_sorted_ND, grad_sorted_ND.new_zeros(ctx.pad, grad_sorted_ND.shape[1])])
        return sum_rows_per_token(grad_sorted_ND, pair_to_sorted_N, ctx.K), None, None, None, None


class _UnpermuteCombine(torch.autograd.Function):
    """``y_t = sum_k w_tk * out[pair_to_sorted[t, k]]``: un-permute and combine in one step.

    The backward writes the output gradient straight into sorted order (the upstream row of
    each sorted pair's token, times its weight), instead of scattering into zeros.
    """

    @staticmethod
    def forward(ctx, out_sorted_ND, weights_TK, sorted_to_pair_N, pair_to_sorted_N):
        ctx.save_for_backward(out_sorted_ND, weights_TK, sorted_to_pair_N)
        return combine(out_sorted_ND, pair_to_sorted_N.view_as(weights_TK), weights_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        out_sorted_ND, weights_TK, sorted_to_pair_N = ctx.saved_tensors
        K = weights_TK.shape[1]
        grad_sorted_ND = grad_TD.index_select(0, sorted_to_pair_N // K)  # each sorted pair's upstream row
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_w_sorted = (grad_sorted_ND * out_sorted_ND).sum(dim=1)
            grad_weights = in_pair_order(grad_w_sorted, sorted_to_pair_N).view_as(weights_TK).to(weights_TK.dtype)
        w_sorted = weights_TK.flatten().index_select(0, sorted_to_pair_N).to(grad_sorted_ND.dtype)
        return grad_sorted_ND.mul_(w_sorted.unsqueeze(1)), grad_weights, None, None


def permute(x_TD: torch.Tensor, pairs: SortedPairs) -> torch.Tensor:
    """(num_valid, D): each real pair's token row, in sorted (by expert) order."""
    return _GatherPairs.apply(x_TD, pairs.sorted_to_pair_N, pairs.pair_to_sorted_N, pairs.num_valid, pairs.top_k)


def unpermute_combine(out_sorted_ND: torch.Tensor, weights_TK: torch.Tensor, pairs: SortedPairs) -> torch.Tensor:
    """(T, D): y_t = sum_k w_tk * out[row of pair (t, k)]; padding pairs read zero rows."""
    padding = weights_TK.numel() - out_sorted_ND.shape[0]
    if padding:
        out_sorted_ND = torch.cat([out_sorted_ND, out_sorted_ND.new_zeros(padding, out_sorted_ND.shape[1])])
    return _UnpermuteCombine.apply(out_sorted_ND, weights_TK, pairs.sorted_to_pair_N, pairs.pair_to_sorted_N)
