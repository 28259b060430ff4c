"""Dispatch: send each token to its experts, run them, and combine the weighted outputs.

    y_t = sum_k  w_tk * expert_{e_tk}(x_t)

Three implementations of that one function, selected by name from ``DISPATCHES``:

- ``loop``: one expert at a time; the readable reference the others are tested against.
- ``capacity``: GShard / Switch style. Every expert has C slots, C = ceil(capacity_factor *
  T * K / E); assignments beyond C are dropped (the token keeps only its residual path for
  that expert) and counted exactly. Fixed shapes, the layout expert parallelism started from.
  ``capacity_scope="sequence"`` gives every sequence its own C = ceil(capacity_factor * S *
  K / E) slots, claimed in token order: the causal variant (a token's drops depend only on
  earlier tokens of its sequence, so a decoder can reproduce them at inference).
- ``sorted``: dropless (MegaBlocks, Gale et al. 2022): sort the token-expert pairs by expert
  and run every expert in one grouped GEMM over the jagged groups.

``capacity`` and ``sorted`` are written as three separable steps (permute, expert compute,
un-permute and combine; ``workbench.moe.permutation``) so that an all-to-all can go between
them (``workbench.parallel`` does). On CPU, where nothing goes between them, the converter of
``workbench.kernels.cpu`` gives a model's sorted layers a dispatch that runs the three as one
fused op; it is tested against ``loop`` like every dispatch here.

Every dispatch takes the same arguments, ``(x_TD, routing, experts, *, batch_shape, padding_mask_BS)``;
those that treat each token on its own ignore the last two. ``build_dispatch`` binds a dispatch's
options (capacity factor, drop policy, capacity scope) when the layer is built, so
``MoELayer.forward`` makes one call with no branches on the config.

Masked routing (expert choice): where ``routing.mask_TK`` is given, a False slot is padding: it
is not computed, not counted and claims no capacity, and its weight gets no gradient. The
common path (``mask_TK is None``) runs exactly the code it runs without masks.

Soft MoE does not route tokens to experts; ``soft_dispatch`` (not in ``DISPATCHES``: the layer
picks it when its router has ``mixes_tokens``) mixes tokens into slots and back.

Shape legend: T tokens, D model dim, E experts, K experts per token, N = T*K token-expert
pairs (flattened row-major from (T, K), so pair n is token n // K), C capacity, B sequences
and S positions (T = B*S), G = B*E (sequence, expert) slot groups;
soft MoE: B sequences, S positions, L = E * slots_per_expert slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from einops import rearrange

from workbench.moe.experts import SwiGLUExperts
from workbench.moe.permutation import combine, permute, sort_pairs_by_expert, unpermute_combine
from workbench.moe.types import DispatchStats, RouterOutput, SoftRouterOutput
from workbench.validation import check, check_choice

if TYPE_CHECKING:
    from workbench.moe.config import MoEConfig


def assignments_per_expert(routing: RouterOutput, num_experts: int) -> torch.Tensor:
    """(E,) long: the real token-expert assignments of each expert (padding slots left out)."""
    ids_TK = routing.expert_ids_TK
    valid_ids = ids_TK.flatten() if routing.mask_TK is None else ids_TK[routing.mask_TK]
    return torch.bincount(valid_ids, minlength=num_experts)


# --- loop: the reference ------------------------------------------------------------------


def loop_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts, *,
                  batch_shape: tuple[int, int] | None = None,
                  padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchStats]:
    """One expert at a time: gather its tokens, run it, add the weighted outputs back."""
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


def sorted_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts, *,
                    batch_shape: tuple[int, int] | None = None,
                    padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchStats]:
    """Dropless: the pairs sorted by expert, every expert in one grouped GEMM, then back to tokens."""
    pairs = sort_pairs_by_expert(routing, experts.num_experts)
    stats = DispatchStats.dropless(pairs.tokens_per_expert)
    x_sorted_ND = permute(x_TD, pairs)  # permute: token rows grouped by expert
    out_sorted_ND = experts.forward_grouped(x_sorted_ND, pairs.counts)  # experts: one grouped GEMM
    return unpermute_combine(out_sorted_ND, routing.weights_TK, pairs), stats  # un-permute and combine


# --- capacity: fixed slots per expert, overflow dropped ---------------------------------

DROP_POLICIES = ("position", "score")  # which assignments keep their slot when an expert is full
# Who shares an expert's C slots: the whole batch, or each sequence on its own (causal).
CAPACITY_SCOPES = ("batch", "sequence")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """C = ceil(capacity_factor * T * K / E) (Switch Transformer eq. 3, with k slots per token).

    ``None`` never drops: C = T, since a token sends at most one of its K pairs to an expert.
    """
    if capacity_factor is None:
        return max(1, num_tokens)
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _pair_priority(routing: RouterOutput, drop_policy: str) -> torch.Tensor:
    """Pair indices from the first to claim a slot to the last.

    ``position``: every token's first choice before any second choice, in token order within
    each round (GShard, Lepikhin et al. 2020, Algorithm 1; Switch keeps the earliest tokens).
    ``score``: highest gate weight first (Batch Prioritized Routing, Riquelme et al. 2021).
    The batch-wide scope only; per sequence, slots go in token order (``_capacity_per_sequence``).
    """
    check_choice("drop_policy", drop_policy, DROP_POLICIES)
    if drop_policy == "score":
        return routing.weights_TK.flatten().argsort(descending=True, stable=True)
    T, K = routing.expert_ids_TK.shape
    return torch.arange(T * K, device=routing.expert_ids_TK.device).view(T, K).t().flatten()


def capacity_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts, *,
                      capacity_factor: float | None = 1.25, drop_policy: str = "position",
                      capacity_scope: str = "batch", batch_shape: tuple[int, int] | None = None,
                      padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchStats]:
    """GShard-style slots: C per expert (``expert_capacity``; ``capacity_factor=None`` never drops).

    ``capacity_scope="batch"``: the T tokens of the batch share each expert's C slots.
    ``"sequence"``: each sequence of ``batch_shape`` = (B, S) has its own, claimed in token
    order (``_capacity_per_sequence``).
    """
    check(capacity_factor is None or (math.isfinite(capacity_factor) and capacity_factor > 0), "capacity_factor",
          "must be a finite number > 0, or None to never drop", capacity_factor)
    check_choice("capacity_scope", capacity_scope, CAPACITY_SCOPES)
    if capacity_scope == "sequence":
        return _capacity_per_sequence(x_TD, routing, experts, capacity_factor, drop_policy, batch_shape)
    T, K = routing.expert_ids_TK.shape
    E, D = experts.num_experts, x_TD.shape[1]
    mask_N = None if routing.mask_TK is None else routing.mask_TK.flatten()
    expert_of_pair_N = routing.expert_ids_TK.flatten()
    group_of_pair_N = expert_of_pair_N  # padding pairs rank in a group E of their own
    if mask_N is None:
        C = expert_capacity(T, K, E, capacity_factor)
    else:
        # C from the real assignments: ceil(capacity_factor * (real pairs) / E)
        C = T if capacity_factor is None else max(1, math.ceil(capacity_factor * int(mask_N.sum()) / E))
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

    out_ECD = experts.forward_batched(rearrange(buffer_ND, "(e c) d -> e c d", e=E))

    # un-permute: a dropped pair reads some slot but gets weight 0, so it adds nothing
    weights_TK = routing.weights_TK * kept_N.view(T, K)
    y_TD = combine(rearrange(out_ECD, "e c d -> (e c) d"), slot_N.view(T, K), weights_TK)

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


def _capacity_per_sequence(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts,
                           capacity_factor: float | None, drop_policy: str,
                           batch_shape: tuple[int, int] | None) -> tuple[torch.Tensor, DispatchStats]:
    """Causal capacity: every sequence gets its own C = ceil(capacity_factor * S * K / E) slots
    per expert (``None``: C = S, never drop), and its pairs claim them in token order, token t's
    K pairs before token t+1's.

    Whether token t keeps its slot at expert e then depends only on how many earlier tokens of
    its own sequence chose e: neither later tokens nor other sequences enter, so a decoder that
    counts per sequence reproduces at inference the drops it trained with. GShard's rounds (every
    token's first choice before any second choice) are not causal: a later token's first choice
    outranks an earlier token's second. Neither is score priority. So ``drop_policy`` must be
    ``"position"``, which per sequence means token order (the two agree for K = 1).

    Padding tokens claim slots as in the batch-wide scope; right-padded, they come after every
    real token of their sequence and never take a real token's slot. Masked routing (expert
    choice) is refused: the router itself compares tokens across the batch, so a per-sequence
    capacity could not make it causal.
    """
    check(drop_policy == "position", "drop_policy", "capacity_scope='sequence' claims slots in token order, "
          "so it needs drop_policy='position' (score priority is not causal)", drop_policy)
    check(routing.mask_TK is None, "capacity_scope", "per-sequence capacity needs token-choice routing; masked "
          "routing (expert choice) compares tokens across the batch and is not causal anyway", "sequence")
    check(batch_shape is not None, "capacity_scope", "per-sequence capacity needs batch_shape=(B, S)", "sequence")
    T, K = routing.expert_ids_TK.shape
    B, S = batch_shape
    check(B * S == T, "batch_shape", f"must hold the routing's T={T} tokens as (B, S)", batch_shape)
    E, D = experts.num_experts, x_TD.shape[1]
    C = expert_capacity(S, K, E, capacity_factor)

    expert_of_pair_N = routing.expert_ids_TK.flatten()
    sequence_of_pair_N = torch.arange(T * K, device=x_TD.device) // (S * K)
    group_of_pair_N = sequence_of_pair_N * E + expert_of_pair_N  # one slot group per (sequence, expert)
    pairs_per_group_G = torch.bincount(group_of_pair_N, minlength=B * E)

    # Rank of each pair within its group. Pairs are numbered in token order, and a stable sort
    # keeps that order within a group: rank = how many earlier pairs of the sequence chose e.
    pair_in_rank_order_N = group_of_pair_N.argsort(stable=True)
    group_start_G = pairs_per_group_G.cumsum(0) - pairs_per_group_G
    rank_N = torch.empty_like(expert_of_pair_N)
    rank_N[pair_in_rank_order_N] = (torch.arange(T * K, device=x_TD.device)
                                    - group_start_G[group_of_pair_N[pair_in_rank_order_N]])
    kept_N = rank_N < C

    # permute into the (E, B*C, D) buffer: expert e's rows are its C slots of sequence 0, then of
    # sequence 1, ..., so the experts run as one batched GEMM over B*C rows each
    kept_pairs = kept_N.nonzero().squeeze(1)
    slot_N = (expert_of_pair_N * B + sequence_of_pair_N) * C + rank_N.clamp(max=C - 1)
    buffer_ND = x_TD.new_zeros(E * B * C, D).index_copy(0, slot_N[kept_pairs], x_TD[kept_pairs // K])

    out_ERD = experts.forward_batched(rearrange(buffer_ND, "(e r) d -> e r d", e=E))

    # un-permute: a dropped pair reads some slot but gets weight 0, so it adds nothing
    weights_TK = routing.weights_TK * kept_N.view(T, K)
    y_TD = combine(rearrange(out_ERD, "e r d -> (e r) d"), slot_N.view(T, K), weights_TK)

    stats = DispatchStats(
        tokens_per_expert=pairs_per_group_G.view(B, E).sum(0),
        kept_per_expert=pairs_per_group_G.clamp(max=C).view(B, E).sum(0),
        dropped_assignments=(~kept_N).sum(),
        dropped_tokens=(~kept_N.view(T, K)).all(dim=1).sum(),
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
    dispatch_BSL, combine_BSL = soft_mixing_weights(routing.slot_logits_TL.view(B, S, L), padding_mask_BS)
    x_BSD = x_TD.view(B, S, D)
    slots_BLD = torch.einsum("bsl,bsd->bld", dispatch_BSL.to(x_TD.dtype), x_BSD)
    # expert e's slots of every sequence in one row block, run as one batch per expert
    slots_ERD = rearrange(slots_BLD, "b (e j) d -> e (b j) d", e=E)
    out_BLD = rearrange(experts.forward_batched(slots_ERD), "e (b j) d -> b (e j) d", b=B)
    y_BSD = torch.einsum("bsl,bld->bsd", combine_BSL.to(out_BLD.dtype), out_BLD)
    return y_BSD.reshape(T, D), DispatchStats.dropless(assignments_per_expert(routing, E))


Dispatch = Callable[..., tuple[torch.Tensor, DispatchStats]]
DISPATCHES: dict[str, Dispatch] = {
    "loop": loop_dispatch,
    "capacity": capacity_dispatch,
    "sorted": sorted_dispatch,
}


def build_dispatch(cfg: MoEConfig, mixes_tokens: bool = False) -> Dispatch:
    """The layer's dispatch with its options bound: ``fn(x_TD, routing, experts, *, batch_shape,
    padding_mask_BS) -> (y_TD, DispatchStats)``.

    A router that mixes tokens (soft MoE) takes ``soft_dispatch``, which needs the (B, S)
    layout and the padding mask, whatever ``cfg.dispatch`` says; ``capacity`` takes its options
    from the config (``capacity_factor``, ``drop_policy`` and ``capacity_scope``).
    """
    if mixes_tokens:
        return soft_dispatch
    dispatch = DISPATCHES[cfg.dispatch]  # a valid name: MoEConfig checked it
    if dispatch is capacity_dispatch:
        return partial(capacity_dispatch, capacity_factor=cfg.capacity_factor, drop_policy=cfg.drop_policy,
                       capacity_scope=cfg.capacity_scope)
    return dispatch


def dropless_form(dispatch: Dispatch) -> Dispatch:
    """The same dispatch with nothing dropped: what generation runs (``MoELayer.forward(...,
    inference=True)``). A capacity dispatch gets ``capacity_factor=None`` (C = T, batch scope);
    every other dispatch never drops and is returned as it is.

    Why decode is dropless: capacity is a training-time device for fixed shapes, and its slots
    count the tokens of a batch (or of a whole sequence), which a decode step does not hold,
    since the rest of the text does not exist yet. Dropping at inference only removes expert
    outputs; the capacity knob of ``workbench.analysis.inference`` measures what that costs.
    """
    if isinstance(dispatch, partial) and dispatch.func is capacity_dispatch:
        return partial(capacity_dispatch, capacity_factor=None, drop_policy=dispatch.keywords["drop_policy"],
                       capacity_scope="batch")
    return dispatch

