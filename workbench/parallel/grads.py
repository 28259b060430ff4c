"""Gradients of a parallel step: summed over the ranks that share a parameter, then clipped as one.

Every rank runs a different share of the step's micro-batches, each scaled by 1 / grad_accum as
a single process scales it, so the step's gradient is the *sum* over ranks:

- replicated parameters (attention, norms, embeddings, routers, shared experts; the experts too
  when expert_parallel == 1): all-reduced over every rank;
- expert parameters (expert_parallel > 1): the all-to-all's backward already brought every
  gradient row of the expert-parallel group to the expert's owner, so they are all-reduced only
  over the ranks that hold the same experts (``expert_dp_group``), and not at all when there is
  one copy of the experts.

Why not DistributedDataParallel: DDP all-reduces every parameter it wraps and averages, while
here the expert slices differ between ranks and must not be reduced over the world. Keeping them
out of DDP needs its private ignore list, ``broadcast_buffers=False`` (the balancing counters
differ between ranks by design) and ``no_sync`` for accumulation; its bucketed all-reduces would
also start from autograd hooks in the middle of the backward, between the MoE layers'
all-to-alls on the same process group. One flat all-reduce per group after the backward is
simpler, deterministic, and on 2 CPU cores costs nothing we could measure against the step
(see ``comm/grad_sync_s`` in the step metrics).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from workbench.parallel.context import ParallelContext

_BUCKET_BYTES = 64 << 20  # flat all-reduce buffers of at most this size (one for a workbench model)


def split_parameters(model: nn.Module, sharded: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, sharded) trainable parameters of ``model``, each in model order."""
    sharded_ids = {id(p) for p in sharded}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in sharded_ids], [p for p in params if id(p) in sharded_ids]


def _buckets(params: list[nn.Parameter]):
    """Consecutive runs of parameters of one dtype and device, at most ``_BUCKET_BYTES`` each."""
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (size + nbytes > _BUCKET_BYTES or p.dtype != bucket[0].dtype or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


def _all_reduce_flat(params: list[nn.Parameter], group) -> None:
    """Sum every ``p.grad`` over ``group``, one flat buffer (and one collective) per bucket.

    A parameter without a gradient on this rank joins as zeros and gets a zero gradient: the
    buffer layout must be the same on every rank.
    """
    import torch.distributed as dist

    for bucket in _buckets(params):
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def sync_gradients(replicated: list[nn.Parameter], sharded: list[nn.Parameter], ctx: ParallelContext) -> float:
    """Sum the gradients over the ranks that share each parameter (module docstring); returns the seconds spent."""
    t0 = time.perf_counter()
    for p in sharded:
        # experts that no token reached this step: a zero gradient, as the single process's grouped
        # GEMM gives them, so AdamW still decays their moments and weights (it skips a None gradient)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if ctx.world_size > 1:
        _all_reduce_flat(replicated, None)
    if sharded and ctx.expert_dp_group is not None:
        _all_reduce_flat(sharded, ctx.expert_dp_group)
    return time.perf_counter() - t0


def clip_grad_norm(replicated: list[nn.Parameter], sharded: list[nn.Parameter], max_norm: float,
                   ctx: ParallelContext) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, its experts spread over ranks.

        ||g|| = || ( ||g_p|| for each replicated p,  sqrt(sum over the group's expert slices ||g_s||^2) ) ||

    The experts of the expert-parallel group enter as one vector; without expert parallelism the
    sum is torch's own, term for term. Every rank gets the same norm and scales its gradients by
    ``min(1, max_norm / (||g|| + 1e-6))``, as torch does; ``max_norm=inf`` only measures. Returns
    the norm before clipping.
    """
    import torch.distributed as dist

    grads = [p.grad for p in replicated if p.grad is not None]
    local = [p.grad for p in sharded if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    if ctx.ep_group is not None:
        device = (local or grads)[0].device
        sq = (torch.stack([torch.linalg.vector_norm(g) for g in local]).square().sum() if local
              else torch.zeros((), device=device))
        dist.all_reduce(sq, group=ctx.ep_group)
        norms.append(sq.sqrt())
    total_norm = torch.linalg.vector_norm(torch.stack(norms))
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads + local:
        g.mul_(clip_coef.to(g.dtype))
    return total_norm.item()
