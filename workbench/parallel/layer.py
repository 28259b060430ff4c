"""Expert parallelism for the MoE layer: E experts split over P ranks, tokens exchanged by all-to-all.

``parallelize_layer`` turns a built ``MoELayer`` into its expert-parallel form in place, through
the three parts the layer exposes for it, so the layer keeps everything its constructor made:

    layer.experts         this rank's E / P experts (``shard_experts``)
    layer.dispatch        ``ExpertParallelDispatch``: the sorted dispatch with an all-to-all on each side
    layer.sum_over_ranks  an all-reduce, for the statistics meant to span the whole global batch

Each rank routes its own tokens, then runs the sorted dispatch with an all-to-all on either side
of the expert compute (MegaBlocks / torchtitan style; Lepikhin et al. 2020 for the idea)::

    route (local)  ->  sort pairs by expert  ->  permute           x_sorted   (N, D), by global expert
    exchange counts                                                    (P, L) rows each rank sends me
    all-to-all     ->  rows for expert j*L..j*L+L-1 go to rank j       x_recv     (R, D), by (source, expert)
    regroup        ->  by (expert, source)                             x_local    (R, D)
    experts        ->  the same grouped GEMM / fused CPU kernel as one process
    regroup back, reverse all-to-all, un-permute and combine           y          (T, D)

    y_t = sum_k w_tk * expert_{e_tk}(x_t)      the same function as the single-process layer

Only the experts are split. The router, the shared experts and the balancing losses stay
replicated and see the rank's own tokens, exactly as one process sees one micro-batch. The
balancing statistics that are meant to span the optimizer step (the global-batch aux loss's
counts, the loss-free bias loads) are all-reduced over every rank, so each rank counts the
whole global batch and makes the same bias update as a single process would.

Shape legend: T tokens, D model dim, E experts, K experts per token, N real token-expert pairs
of this rank, P expert-parallel ranks, L = E / P experts per rank, R rows received.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from workbench.moe.experts import SwiGLUExperts
from workbench.moe.layer import MoELayer, this_process_only
from workbench.moe.permutation import permute, sort_pairs_by_expert, unpermute_combine
from workbench.moe.types import DispatchStats, RouterOutput
from workbench.parallel.comm import CommStats, all_to_all, exchange_counts
from workbench.parallel.context import ParallelContext


def source_to_expert_order(counts_PL: torch.Tensor) -> torch.Tensor:
    """(R,) long: row n of the (expert, source) layout is row ``order[n]`` of the (source, expert) one.

    The all-to-all delivers rank 0's rows for my L experts, then rank 1's, ...; the grouped GEMM
    wants expert 0's rows from every rank, then expert 1's, ... Both are lists of contiguous
    segments, (p, l) of length ``counts_PL[p, l]``; this lists, for each segment in the second
    order, the source positions of its rows.
    """
    P, L = counts_PL.shape
    lengths_PL = counts_PL.flatten()
    start_in_source_PL = lengths_PL.cumsum(0) - lengths_PL
    lengths_LP = counts_PL.t().flatten()
    start_in_source_LP = start_in_source_PL.view(P, L).t().flatten()
    start_in_target_LP = lengths_LP.cumsum(0) - lengths_LP
    R = int(lengths_PL.sum())
    shift_R = torch.repeat_interleave(start_in_source_LP - start_in_target_LP, lengths_LP, output_size=R)
    return shift_R + torch.arange(R, device=counts_PL.device)


class _Regroup(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``; the backward gathers by its inverse (no scatter)."""

    @staticmethod
    def forward(ctx, x_RD, order_R, inverse_R):
        ctx.save_for_backward(inverse_R)
        return x_RD.index_select(0, order_R)

    @staticmethod
    def backward(ctx, grad_RD):
        (inverse_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inverse_R), None, None


class ExpertParallelDispatch:
    """The sorted dispatch with an all-to-all on each side of the experts (see the module docstring).

    Called as the layer calls every dispatch, ``(x_TD, routing, experts, batch_shape, padding_mask_BS)``,
    with ``experts`` this rank's L experts; returns ``(y_TD, DispatchStats)`` whose counts are this
    rank's tokens over all E experts, as a single process reports them for the same tokens.
    """

    def __init__(self, num_experts: int, ep_size: int, group, stats: CommStats):
        import torch.distributed as dist

        self.num_experts, self.ep_size, self.group, self.stats = num_experts, ep_size, group, stats
        self.ep_rank = dist.get_rank(group)

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts,
                 batch_shape: tuple[int, int] | None = None,
                 padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchStats]:
        E, P = self.num_experts, self.ep_size
        L = E // P
        pairs = sort_pairs_by_expert(routing, E)  # padding pairs (expert choice) sort last and never travel
        stats = DispatchStats.dropless(pairs.tokens_per_expert)

        # Split sizes: what I send to each rank (my pairs for its experts), and, from every rank,
        # what it sends to each of my experts.
        send_splits = [sum(pairs.counts[j * L:(j + 1) * L]) for j in range(P)]
        counts_PL = exchange_counts(pairs.tokens_per_expert, self.group)
        received_PL = counts_PL.tolist()  # host copy: the split sizes and the GEMM's groups
        recv_splits = [sum(row) for row in received_PL]
        counts_L = [sum(column) for column in zip(*received_PL, strict=True)]  # per local expert, from every rank
        self._record_rows(send_splits, recv_splits, counts_L)

        x_sorted_ND = permute(x_TD, pairs)
        x_recv_RD = all_to_all(x_sorted_ND, send_splits, recv_splits, self.group, self.stats)
        if L > 1:  # one expert per rank: (source, expert) order is already (expert, source)
            order_R = source_to_expert_order(counts_PL)
            inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(order_R.numel(),
                                                                                    device=order_R.device))
            x_local_RD = _Regroup.apply(x_recv_RD, order_R, inverse_R)
        else:
            x_local_RD = x_recv_RD
        out_local_RD = experts.forward_grouped(x_local_RD, counts_L)
        out_recv_RD = _Regroup.apply(out_local_RD, inverse_R, order_R) if L > 1 else out_local_RD
        out_sorted_ND = all_to_all(out_recv_RD, recv_splits, send_splits, self.group, self.stats)
        return unpermute_combine(out_sorted_ND, routing.weights_TK, pairs), stats

    def _record_rows(self, send_splits: list[int], recv_splits: list[int], counts_L: list[int]) -> None:
        me = self.ep_rank
        self.stats.rows_sent += sum(send_splits) - send_splits[me]
        self.stats.rows_received += sum(recv_splits) - recv_splits[me]
        self.stats.expert_rows += sum(counts_L)


def shard_experts(experts: SwiGLUExperts, lo: int, hi: int) -> SwiGLUExperts:
    """Copies of experts ``lo .. hi - 1`` of ``experts``, as a module of the same class (a fused one
    stays fused), on the same device and dtype, that knows where its slice starts."""
    D, H = experts.d_model, experts.hidden
    # Built on the meta device: no memory and no draw from the random generator for an init that
    # the copies below replace (a single process's generator state must stay where it was).
    with torch.device("meta"):
        local = type(experts)(hi - lo, D, H)
    for name in ("w1", "w3", "w2"):
        setattr(local, name, nn.Parameter(getattr(experts, name).detach()[lo:hi].clone(),
                                          requires_grad=getattr(experts, name).requires_grad))
    local.first_expert = experts.first_expert + lo
    return local


def parallelize_layer(layer: MoELayer, ctx: ParallelContext) -> MoELayer:
    """Make ``layer`` expert parallel over the expert-parallel group of ``ctx``, in place; returns it.

    It keeps its router, shared experts, buffers and everything else its constructor built, and
    of its experts it keeps this rank's ``E / P`` (``ctx.expert_range``). The state dict has the
    same keys as the single-process layer's; the expert tensors hold this rank's slice, and a
    full-size (single-process) expert tensor given to ``load_state_dict`` is sliced on the way in,
    so a checkpoint written by one process loads on any number of ranks.

    With ``expert_parallel == 1`` (data parallelism alone) it keeps every expert and its own
    dispatch, and only sums the balancing statistics over the ranks: each rank holds a different
    part of the global batch, so the global-batch aux loss's f and the loss-free bias's loads
    count the tokens of all of them, and every rank makes the same bias update.

    Every rank must call ``forward`` (and ``backward``) together: the all-to-alls and the
    all-reduces of the statistics are collective.
    """
    cfg = layer.cfg
    ctx.config.check_model(cfg)
    if ctx.ep_size > 1:
        lo, hi = ctx.expert_range(cfg.num_experts)
        layer.experts = shard_experts(layer.experts, lo, hi)
        layer.dispatch = ExpertParallelDispatch(cfg.num_experts, ctx.ep_size, ctx.ep_group, ctx.stats)
        layer.register_load_state_dict_pre_hook(_slice_full_experts)
    layer.sum_over_ranks = partial(_all_reduce_sum, ctx=ctx)
    return layer


def _all_reduce_sum(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum over every rank (a new tensor; ``t`` is left as it is)."""
    import torch.distributed as dist

    if ctx.world_size == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def _slice_full_experts(module: MoELayer, state_dict: dict, prefix: str, *args) -> None:
    # load_state_dict pre-hook: a full-size expert tensor (the single-process layout of every
    # checkpoint) becomes this rank's slice; a tensor that is already a slice passes unchanged.
    E, experts = module.cfg.num_experts, module.experts
    lo, hi = experts.first_expert, experts.first_expert + experts.num_experts
    for name in ("w1", "w3", "w2"):
        key = f"{prefix}experts.{name}"
        value = state_dict.get(key)
        if value is not None and value.shape[0] == E and value.shape[0] != hi - lo:
            state_dict[key] = value[lo:hi]


def parallelize_model(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """``parallelize_layer`` on every ``MoELayer`` of ``model`` (an ``MoELM``), in place; returns
    ``model``. With ``expert_parallel == 1`` the experts stay whole, replicated like every other
    parameter, and only the balancing statistics are summed over the ranks.

    Build the model with the same seed on every rank first: the experts each rank keeps are
    slices of that one initialisation, so the parallel model starts where a single process would.
    """
    for layer in model.modules():
        if isinstance(layer, MoELayer) and layer.sum_over_ranks is this_process_only:  # not parallel yet
            parallelize_layer(layer, ctx)
    return model


def expert_parallel_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` whose experts are split over ranks (expert_parallel > 1)."""
    return [m for m in model.modules() if isinstance(m, MoELayer) and isinstance(m.dispatch, ExpertParallelDispatch)]


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that differ between the ranks of an expert-parallel group: the local experts."""
    return [p for layer in expert_parallel_layers(model) for p in layer.experts.parameters()]
