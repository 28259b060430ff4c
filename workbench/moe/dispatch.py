"""Dispatch: send each token to its experts, run them, and combine the weighted outputs.

    y_t = sum_k  w_tk * expert_{e_tk}(x_t)

Three implementations of that one function, selected by name from ``DISPATCHES``:

- ``loop``: one expert at a time; the readable reference the others are tested against.
- ``capacity``: GShard / Switch style. Every expert has C slots, C = ceil(capacity_factor *
  T * K / E); assignments beyond C are dropped (the token keeps only its residual path for
  that expert) and counted exactly. Fixed shapes, the layout expert parallelism started from.
- ``sorted``: dropless (MegaBlocks, Gale et al. 2022): sort the token-expert pairs by expert
  and run every expert in one grouped GEMM over the jagged groups.

``capacity`` and ``sorted`` are written as three separable steps (permute, expert compute,
un-permute and combine) so that an all-to-all can later go between them. On CPU, where no
all-to-all goes between them, ``sorted`` runs the three as one fused op
(``_FusedSortedExperts``) and ``capacity`` runs its experts with the same kernel;
both are tested against ``loop`` with the kernel on and off.

Masked routing (expert choice): where ``routing.mask_TK`` is given, a False slot is padding: it
is not computed, not counted and claims no capacity, and its weight gets no gradient. The
common path (``mask_TK is None``) runs exactly the code it runs without masks.

Soft MoE does not route tokens to experts; ``soft_dispatch`` (not in ``DISPATCHES``: the layer
picks it when its router has ``mixes_tokens``) mixes tokens into slots and back.

Shape legend: T tokens, D model dim, E experts, K experts per token, N = T*K token-expert
pairs (flattened row-major from (T, K), so pair n is token n // K), C capacity;
soft MoE: B sequences, S positions, L = E * slots_per_expert slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from workbench.moe import cpu_kernels
from workbench.moe.experts import SwiGLUExperts
from workbench.moe.routers import RouterOutput, SoftRouterOutput


@dataclass
class DispatchStats:
    tokens_per_expert: torch.Tensor  # (E,) long: assignments routed to each expert, before drops
    kept_per_expert: torch.Tensor  # (E,) long: assignments the experts actually processed
    dropped_assignments: torch.Tensor  # () long: token-expert pairs that lost their slot
    dropped_tokens: torch.Tensor  # () long: tokens that had assignments and lost all of them
    capacity: int | None = None  # slots per expert; None for dropless dispatch

    @classmethod
    def dropless(cls, tokens_per_expert: torch.Tensor) -> DispatchStats:
        zero = tokens_per_expert.new_zeros(())
        return cls(tokens_per_expert, tokens_per_expert, zero, zero.clone(), None)


def assignments_per_expert(routing: RouterOutput, num_experts: int) -> torch.Tensor:
    """(E,) long: the real token-expert assignments of each expert (padding slots left out)."""
    ids_TK = routing.expert_ids_TK
    valid_ids = ids_TK.flatten() if routing.mask_TK is None else ids_TK[routing.mask_TK]
    return torch.bincount(valid_ids, minlength=num_experts)


def combine(rows_RD: torch.Tensor, row_of_pair_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * rows[row_of_pair[t, k]]: gather each token's K expert outputs and
    weight them, fused in one pass by ``embedding_bag`` (bag t holds token t's K rows)."""
    return F.embedding_bag(row_of_pair_TK, rows_RD, per_sample_weights=weights_TK.to(rows_RD.dtype), mode="sum")


def _sum_rows_per_token(rows_ND: torch.Tensor, pair_to_sorted_N: torch.Tensor, K: int) -> torch.Tensor:
    """(T, D): each token's K rows (pair t*K + k sits at row pair_to_sorted[t*K + k]) summed,
    gathered and added in one fused ``embedding_bag`` pass."""
    return F.embedding_bag(pair_to_sorted_N.view(-1, K), rows_ND, mode="sum")


def _in_pair_order(sorted_N: torch.Tensor, sorted_to_pair_N: torch.Tensor) -> torch.Tensor:
    """Undo the sort of a per-pair value: ``out[sorted_to_pair[n]] = sorted[n]``."""
    return torch.empty_like(sorted_N).index_copy_(0, sorted_to_pair_N, sorted_N)


# --- loop: the reference ------------------------------------------------------------------


def loop_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> tuple[
        torch.Tensor, DispatchStats]:
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        is_e_TK = routing.expert_ids_TK == e
        if routing.mask_TK is not None:
            is_e_TK = is_e_TK & routing.mask_TK
        token_idx, slot_idx = torch.where(is_e_TK)
        if token_idx.numel() == 0:
            continue
        out = experts.forward_one(e, x_TD[token_idx])
        weight = routing.weights_TK[token_idx, slot_idx].unsqueeze(1).to(out.dtype)
        y_TD = y_TD.index_add(0, token_idx, out * weight)
    return y_TD, DispatchStats.dropless(assignments_per_expert(routing, experts.num_experts))


# --- sorted: dropless, one grouped GEMM ----------------------------------------------------


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
        return _sum_rows_per_token(grad_sorted_ND, pair_to_sorted_N, ctx.K), None, None, None, None


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
            grad_weights = _in_pair_order(grad_w_sorted, sorted_to_pair_N).view_as(weights_TK).to(weights_TK.dtype)
        w_sorted = weights_TK.flatten().index_select(0, sorted_to_pair_N).to(grad_sorted_ND.dtype)
        return grad_sorted_ND.mul_(w_sorted.unsqueeze(1)), grad_weights, None, None


class _FusedSortedExperts(torch.autograd.Function):
    """Permute, experts, un-permute and combine in one op, with the fused CPU kernel.

    Row n of the experts' input is token ``sorted_to_pair[n] // K``; the kernel gathers each
    thread's rows itself, and its backward gathers the output gradient, weights it and computes
    the routing weights' gradient in the same pass (what ``_GatherPairs`` and
    ``_UnpermuteCombine`` do in separate steps), so no sorted copy of x or of the gradient is
    written to memory. Every pair must be a real assignment (no slot mask).
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1_EDH, w3_EDH, w2_EHD, sorted_to_pair_N, pair_to_sorted_N, counts):
        token_of_row_N = sorted_to_pair_N // weights_TK.shape[1]
        out_sorted_ND, gate_NH, up_NH = cpu_kernels.require_kernel().swiglu_experts_forward(
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
        grad_rows_ND, grad_weight_of_row_N, *grad_expert_weights = cpu_kernels.require_kernel().swiglu_experts_backward(
            grad_TD.contiguous(), x_TD, token_of_row_N, weight_of_row_N, out_sorted_ND, gate_NH, up_NH,
            w1_EDH, w3_EDH, w2_EHD, ctx.counts)
        grad_x_TD = _sum_rows_per_token(grad_rows_ND, pair_to_sorted_N, weights_TK.shape[1])
        grad_weights_TK = (_in_pair_order(grad_weight_of_row_N, sorted_to_pair_N)
                           .view_as(weights_TK).to(weights_TK.dtype))
        return grad_x_TD, grad_weights_TK, *grad_expert_weights, None, None, None


def sorted_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> tuple[
        torch.Tensor, DispatchStats]:
    T, K = routing.expert_ids_TK.shape
    E = experts.num_experts
    expert_of_pair_N = routing.expert_ids_TK.flatten()
    if routing.mask_TK is not None:
        # padding pairs join a group E after every expert: sorted last, never computed
        expert_of_pair_N = expert_of_pair_N.masked_fill(~routing.mask_TK.flatten(), E)
    # permute: a stable sort groups the pairs by expert, tokens in order within a group
    sorted_to_pair_N = expert_of_pair_N.argsort(stable=True)
    pair_to_sorted_N = torch.empty_like(sorted_to_pair_N)
    pair_to_sorted_N[sorted_to_pair_N] = torch.arange(T * K, device=x_TD.device)
    tokens_per_expert = torch.bincount(expert_of_pair_N, minlength=E)
    if routing.mask_TK is not None:
        tokens_per_expert = tokens_per_expert[:E]
    counts = tokens_per_expert.tolist()
    num_valid = sum(counts)
    if routing.mask_TK is None and cpu_kernels.fused_kernel_applies(x_TD, experts.w1):
        # CPU: the three steps below in one fused op (the permutation never materialises)
        y_TD = _FusedSortedExperts.apply(x_TD.contiguous(), routing.weights_TK.contiguous(), experts.w1, experts.w3,
                                         experts.w2, sorted_to_pair_N, pair_to_sorted_N, counts)
        return y_TD, DispatchStats.dropless(tokens_per_expert)
    x_sorted_ND = _GatherPairs.apply(x_TD, sorted_to_pair_N, pair_to_sorted_N, num_valid, K)

    # expert compute: one grouped GEMM per weight matrix over the jagged groups
    out_sorted_ND = experts.forward_grouped(x_sorted_ND, counts)
    if num_valid < T * K:  # padding pairs read zero rows
        out_sorted_ND = torch.cat([out_sorted_ND, out_sorted_ND.new_zeros(T * K - num_valid, x_TD.shape[1])])

    # un-permute (the inverse permutation) and combine
    y_TD = _UnpermuteCombine.apply(out_sorted_ND, routing.weights_TK, sorted_to_pair_N, pair_to_sorted_N)
    return y_TD, DispatchStats.dropless(tokens_per_expert)


# --- capacity: fixed slots per expert, overflow dropped ---------------------------------


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * K / E) (Switch Transformer eq. 3, with k slots per token)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _pair_priority(routing: RouterOutput, drop_policy: str) -> torch.Tensor:
    """Pair indices from the first to claim a slot to the last.

    ``position``: every token's first choice before any second choice, in token order within
    each round (GShard, Lepikhin et al. 2020, Algorithm 1; Switch keeps the earliest tokens).
    ``score``: highest gate weight first (Batch Prioritized Routing, Riquelme et al. 2021).
    """
    T, K = routing.expert_ids_TK.shape
    if drop_policy == "position":
        return torch.arange(T * K, device=routing.expert_ids_TK.device).view(T, K).t().flatten()
    if drop_policy == "score":
        return routing.weights_TK.flatten().argsort(descending=True, stable=True)
    raise ValueError(f"drop_policy={drop_policy!r} is invalid: allowed values are position, score")


def capacity_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts, *,
                      capacity_factor: float = 1.25, drop_policy: str = "position") -> tuple[
        torch.Tensor, DispatchStats]:
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: must be > 0")
    T, K = routing.expert_ids_TK.shape
    E, D = experts.num_experts, x_TD.shape[1]
    mask_N = None if routing.mask_TK is None else routing.mask_TK.flatten()
    expert_of_pair_N = routing.expert_ids_TK.flatten()
    group_of_pair_N = expert_of_pair_N  # padding pairs rank in a group E of their own
    if mask_N is None:
        C = expert_capacity(T, K, E, capacity_factor)
    else:
        # C from the real assignments: ceil(capacity_factor * (real pairs) / E)
        C = max(1, math.ceil(capacity_factor * int(mask_N.sum()) / E))
        group_of_pair_N = expert_of_pair_N.masked_fill(~mask_N, E)
    tokens_per_group = torch.bincount(group_of_pair_N, minlength=E)
    tokens_per_expert = tokens_per_group if mask_N is None else tokens_per_group[:E]

    # Rank of each pair among the pairs sent to the same expert, in priority order.
    priority_N = _pair_priority(routing, drop_policy)
    by_expert_N = group_of_pair_N[priority_N].argsort(stable=True)
    pair_in_rank_order_N = priority_N[by_expert_N]
    group_start_E = tokens_per_group.cumsum(0) - tokens_per_group
    rank_N = torch.empty_like(expert_of_pair_N)
    rank_N[pair_in_rank_order_N] = (torch.arange(T * K, device=x_TD.device)
                                    - group_start_E[group_of_pair_N[pair_in_rank_order_N]])
    kept_N = rank_N < C
    if mask_N is not None:
        kept_N = kept_N & mask_N

    # permute into the (E, C, D) buffer; empty slots stay zero (and SwiGLU maps zero to zero)
    kept_pairs = kept_N.nonzero().squeeze(1)
    slot_N = expert_of_pair_N * C + rank_N.clamp(max=C - 1)
    buffer_ND = x_TD.new_zeros(E * C, D).index_copy(0, slot_N[kept_pairs], x_TD[kept_pairs // K])

    out_ECD = experts.forward_batched(buffer_ND.view(E, C, D))

    # un-permute: a dropped pair reads some slot but gets weight 0, so it adds nothing
    weights_TK = routing.weights_TK * kept_N.view(T, K)
    y_TD = combine(out_ECD.view(E * C, D), slot_N.view(T, K), weights_TK)

    kept_per_expert = tokens_per_expert.clamp(max=C)
    if mask_N is None:
        dropped_assignments = (~kept_N).sum()
        dropped_tokens = (~kept_N.view(T, K)).all(dim=1).sum()
    else:
        dropped_assignments = (mask_N & ~kept_N).sum()
        dropped_tokens = (routing.mask_TK.any(dim=1) & ~kept_N.view(T, K).any(dim=1)).sum()
    stats = DispatchStats(
        tokens_per_expert=tokens_per_expert,
        kept_per_expert=kept_per_expert,
        dropped_assignments=dropped_assignments,
        dropped_tokens=dropped_tokens,
        capacity=C,
    )
    return y_TD, stats


# --- soft: every slot a weighted average of tokens (Soft MoE) -----------------------------


def soft_mixing_weights(slot_logits_BSL: torch.Tensor, padding_mask_BS: torch.Tensor | None = None) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Soft MoE's dispatch and combine weights (Puigcerver et al. 2023, arXiv:2308.00951).

        D[b, s, l] = exp(logit[b, s, l]) / sum_s' exp(logit[b, s', l])    over a sequence's tokens
        C[b, s, l] = exp(logit[b, s, l]) / sum_l' exp(logit[b, s, l'])    over slots

    Padding tokens (``padding_mask_BS`` False) get no dispatch weight; a sequence of padding
    only dispatches uniformly, so nothing divides by zero. Both fp32, shape (B, S, L).
    """
    dispatch_logits = slot_logits_BSL
    if padding_mask_BS is not None:
        fill = torch.finfo(slot_logits_BSL.dtype).min
        dispatch_logits = slot_logits_BSL.masked_fill(~padding_mask_BS.unsqueeze(-1), fill)
    return dispatch_logits.softmax(dim=1), slot_logits_BSL.softmax(dim=2)


def soft_dispatch(x_TD: torch.Tensor, routing: SoftRouterOutput, experts: SwiGLUExperts, *,
                  batch_shape: tuple[int, int] | None = None,
                  padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchStats]:
    """Soft MoE: mix each sequence's tokens into slots, run every expert on its slots, mix back.

        slots[b, l] = sum_s D[b, s, l] x[b, s]            out[b, l] = expert_{l // slots}(slots[b, l])
        y[b, s]     = sum_l C[b, s, l] out[b, l]

    Mixing stays within a sequence (``batch_shape`` = (B, S); None: all T tokens are one
    sequence), so sequences of a batch never see each other. Every expert runs on exactly
    B * slots_per_expert rows, one batched GEMM, nothing dropped. ``stats.tokens_per_expert``
    counts the router's attribution (``routing.expert_ids_TK``), not compute: see
    ``SoftMoERouter``.
    """
    T, D = x_TD.shape
    B, S = batch_shape if batch_shape is not None else (1, T)
    E = experts.num_experts
    L = routing.slot_logits_TL.shape[1]
    slots = L // E
    dispatch_BSL, combine_BSL = soft_mixing_weights(routing.slot_logits_TL.view(B, S, L), padding_mask_BS)
    x_BSD = x_TD.view(B, S, D)
    slots_BLD = torch.einsum("bsl,bsd->bld", dispatch_BSL.to(x_TD.dtype), x_BSD)
    # expert e's slots of every sequence in one row block: (E, B * slots, D)
    slots_ERD = slots_BLD.view(B, E, slots, D).transpose(0, 1).reshape(E, B * slots, D)
    out_BLD = experts.forward_batched(slots_ERD).view(E, B, slots, D).transpose(0, 1).reshape(B, L, D)
    y_BSD = torch.einsum("bsl,bld->bsd", combine_BSL.to(out_BLD.dtype), out_BLD)
    return y_BSD.reshape(T, D), DispatchStats.dropless(assignments_per_expert(routing, E))


Dispatch = Callable[..., tuple[torch.Tensor, DispatchStats]]
DISPATCHES: dict[str, Dispatch] = {
    "loop": loop_dispatch,
    "capacity": capacity_dispatch,
    "sorted": sorted_dispatch,
}
