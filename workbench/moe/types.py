"""The data that flows through an MoE layer, in one place that every other ``moe`` module imports.

    router(x)            -> RouterOutput   which experts each token goes to, with what weight
    sort_pairs_by_expert -> SortedPairs    the dispatch's plan: token-expert pairs grouped by expert
    dispatch(x, routing) -> DispatchStats  what the experts processed and what was dropped
    MoELayer(x)          -> RoutingInfo    all of the above for one batch, plus the balancing losses

Plain dataclasses with no behaviour beyond a property, so importing them pulls in nothing else.

Shape legend: T tokens, E experts, K experts per token, N = T*K token-expert pairs, L soft MoE slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RouterOutput:
    expert_ids_TK: torch.Tensor  # long: the K experts chosen for each token
    weights_TK: torch.Tensor  # fp32: combine weights of those experts
    scores_TE: torch.Tensor  # fp32: probabilities (softmax) or affinities (sigmoid) of every expert
    logits_TE: torch.Tensor  # fp32: raw router logits (the z-loss reads these)
    # bool: True where slot (t, k) is a real assignment. None (every router but expert choice):
    # all are. Padding slots carry weight 0 and an in-range expert id, and every consumer skips them.
    mask_TK: torch.Tensor | None = None


@dataclass
class SoftRouterOutput(RouterOutput):
    """Soft MoE's routing: the slot logits that ``soft_dispatch`` mixes with, plus per-expert
    summaries in the common fields (see ``workbench.moe.routers.SoftMoERouter``)."""

    slot_logits_TL: torch.Tensor | None = None  # fp32: x . phi_l for every slot l = e * slots + j


@dataclass
class SortedPairs:
    """The token-expert pairs sorted by expert (stable: tokens in order within an expert)."""

    sorted_to_pair_N: torch.Tensor  # long: sorted row n holds pair sorted_to_pair[n]
    pair_to_sorted_N: torch.Tensor  # long: the inverse permutation
    tokens_per_expert: torch.Tensor  # (E,) long: real pairs of each expert
    counts: list[int]  # the same, on the host: the grouped GEMM's group sizes
    num_valid: int  # real pairs; padding pairs (expert choice) are sorted after them
    top_k: int  # K, so that pair n is token n // K


@dataclass
class DispatchStats:
    tokens_per_expert: torch.Tensor  # (E,) long: assignments routed to each expert, before drops
    kept_per_expert: torch.Tensor  # (E,) long: assignments the experts actually processed
    dropped_assignments: torch.Tensor  # () long: token-expert pairs that lost their slot
    dropped_tokens: torch.Tensor  # () long: tokens that had assignments and lost all of them
    capacity: int | None = None  # slots per expert (per sequence, capacity_scope="sequence"); None: dropless

    @classmethod
    def dropless(cls, tokens_per_expert: torch.Tensor) -> DispatchStats:
        zero = tokens_per_expert.new_zeros(())
        return cls(tokens_per_expert, tokens_per_expert, zero, zero.clone(), None)


@dataclass
class RoutingInfo:
    """What one MoE layer did with one batch; ``workbench.moe.metrics`` turns it into numbers."""

    router_output: RouterOutput  # what the router decided for this batch
    stats: DispatchStats
    losses: dict[str, torch.Tensor]  # raw, unweighted, one per name of balance.BALANCE_LOSSES
    weighted_loss: torch.Tensor  # sum of the losses times their configured weights
    batch_shape: tuple[int, int]  # (B, S), to view the (T, ...) tensors per sequence

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self.stats.tokens_per_expert
