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
un-permute and combine) so that an all-to-all can later go between them.

Shape legend: T tokens, D model dim, E experts, K experts per token, N = T*K token-expert
pairs (flattened row-major from (T, K), so pair n is token n // K), C capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.moe.experts import SwiGLUExperts
from workbench.moe.routers import RouterOutput


@dataclass
class DispatchStats:
    tokens_per_expert: torch.Tensor  # (E,) long: assignments routed to each expert, before drops
    kept_per_expert: torch.Tensor  # (E,) long: assignments the experts actually processed
    dropped_assignments: torch.Tensor  # () long: token-expert pairs that lost their slot
    dropped_tokens: torch.Tensor  # () long: tokens that lost every one of their K slots
    capacity: int | None = None  # slots per expert; None for dropless dispatch

    @classmethod
    def dropless(cls, tokens_per_expert: torch.Tensor) -> DispatchStats:
        zero = tokens_per_expert.new_zeros(())
        return cls(tokens_per_expert, tokens_per_expert, zero, zero.clone(), None)


def combine(pair_out_ND: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * out_(t,k); the pair outputs are in (t, k) order."""
    T, K = weights_TK.shape
    pair_out_TKD = pair_out_ND.view(T, K, -1)
    return torch.einsum("tk,tkd->td", weights_TK.to(pair_out_ND.dtype), pair_out_TKD)


# --- loop: the reference ------------------------------------------------------------------


def loop_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> tuple[
        torch.Tensor, DispatchStats]:
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        token_idx, slot_idx = torch.where(routing.expert_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        out = experts.forward_one(e, x_TD[token_idx])
        weight = routing.weights_TK[token_idx, slot_idx].unsqueeze(1).to(out.dtype)
        y_TD = y_TD.index_add(0, token_idx, out * weight)
    tokens_per_expert = torch.bincount(routing.expert_ids_TK.flatten(), minlength=experts.num_experts)
    return y_TD, DispatchStats.dropless(tokens_per_expert)


# --- sorted: dropless, one grouped GEMM ----------------------------------------------------


def sorted_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> tuple[
        torch.Tensor, DispatchStats]:
    T, K = routing.expert_ids_TK.shape
    expert_of_pair_N = routing.expert_ids_TK.flatten()
    # permute: a stable sort groups the pairs by expert, tokens in order within a group
    sorted_to_pair_N = expert_of_pair_N.argsort(stable=True)
    tokens_per_expert = torch.bincount(expert_of_pair_N, minlength=experts.num_experts)
    x_sorted_ND = x_TD.index_select(0, sorted_to_pair_N // K)

    # expert compute: one grouped GEMM per weight matrix over the jagged groups
    out_sorted_ND = experts.forward_grouped(x_sorted_ND, tokens_per_expert.tolist())

    # un-permute (the inverse permutation) and combine
    pair_to_sorted_N = torch.empty_like(sorted_to_pair_N)
    pair_to_sorted_N[sorted_to_pair_N] = torch.arange(T * K, device=x_TD.device)
    y_TD = combine(out_sorted_ND.index_select(0, pair_to_sorted_N), routing.weights_TK)
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
    C = expert_capacity(T, K, E, capacity_factor)
    expert_of_pair_N = routing.expert_ids_TK.flatten()
    tokens_per_expert = torch.bincount(expert_of_pair_N, minlength=E)

    # Rank of each pair among the pairs sent to the same expert, in priority order.
    priority_N = _pair_priority(routing, drop_policy)
    by_expert_N = expert_of_pair_N[priority_N].argsort(stable=True)
    pair_in_rank_order_N = priority_N[by_expert_N]
    group_start_E = tokens_per_expert.cumsum(0) - tokens_per_expert
    rank_N = torch.empty_like(expert_of_pair_N)
    rank_N[pair_in_rank_order_N] = (torch.arange(T * K, device=x_TD.device)
                                    - group_start_E[expert_of_pair_N[pair_in_rank_order_N]])
    kept_N = rank_N < C

    # permute into the (E, C, D) buffer; empty slots stay zero (and SwiGLU maps zero to zero)
    kept_pairs = kept_N.nonzero().squeeze(1)
    slot_N = expert_of_pair_N * C + rank_N.clamp(max=C - 1)
    buffer_ND = x_TD.new_zeros(E * C, D).index_copy(0, slot_N[kept_pairs], x_TD[kept_pairs // K])

    out_ECD = experts.forward_batched(buffer_ND.view(E, C, D))

    # un-permute: a dropped pair reads some slot but gets weight 0, so it adds nothing
    weights_TK = routing.weights_TK * kept_N.view(T, K)
    y_TD = combine(out_ECD.view(E * C, D).index_select(0, slot_N), weights_TK)

    kept_per_expert = tokens_per_expert.clamp(max=C)
    stats = DispatchStats(
        tokens_per_expert=tokens_per_expert,
        kept_per_expert=kept_per_expert,
        dropped_assignments=(~kept_N).sum(),
        dropped_tokens=(~kept_N.view(T, K)).all(dim=1).sum(),
        capacity=C,
    )
    return y_TD, stats


Dispatch = Callable[..., tuple[torch.Tensor, DispatchStats]]
DISPATCHES: dict[str, Dispatch] = {
    "loop": loop_dispatch,
    "capacity": capacity_dispatch,
    "sorted": sorted_dispatch,
}
