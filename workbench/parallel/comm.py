"""The all-to-all of expert parallelism, with autograd, and a record of what it moved.

    exchange(x, send_splits, recv_splits): rank r sends rows  x[offset_r(j) : offset_r(j) + send_splits[j]]
                                           to rank j, and receives recv_splits[i] rows from rank i,
                                           stacked in rank order

The backward of an all-to-all is the all-to-all with the split sizes swapped: each row's
gradient goes back to the rank that sent the row. ``_AllToAll`` is that pair, built on the
public, stable ``torch.distributed.all_to_all_single`` (with ``input_split_sizes`` and
``output_split_sizes``), which gloo (CPU), NCCL (CUDA) and HCCL (Ascend) all implement for
every floating dtype, so the same code runs on the three. (``torch.distributed.nn.functional``
has an autograd all-to-all too, but it is deprecated in favour of the private
``_functional_collectives``; and a Function of our own can count bytes and time.)

Split sizes must be known on the host before the call: each rank first tells the others how
many rows it will send to each of their experts (``exchange_counts``, a fixed-size all-to-all of
E integers), which is also how a rank learns how many rows it will receive.

Shape legend: R rows of a buffer, D row width, E experts, P expert-parallel ranks, L = E / P.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import torch


@dataclass
class CommStats:
    """What this rank's all-to-alls did since the last ``reset()`` (the trainer resets every step).

    Rows and bytes count traffic with *other* ranks only: the rows a rank keeps for its own
    experts never leave it. ``rows_*`` are the token-expert rows of the forward dispatch (the
    tokens a rank sends to other ranks' experts); ``bytes_*`` count every exchange (dispatch and
    combine, forward and backward), what the network carries.
    """

    rows_sent: int = 0
    rows_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    # wall time inside all-to-all calls (the device synchronised around them): the transfer, and the
    # wait for the slowest rank of the group to arrive, so an uneven load across ranks shows up here
    seconds: float = 0.0
    calls: int = 0
    expert_rows: int = 0  # token-expert rows this rank's experts computed (forward): its load

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def as_list(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _synchronize(device: torch.device) -> None:
    # NCCL and HCCL run collectives asynchronously on a stream: time them from the host only once
    # the device has finished what came before and what the call queued.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def exchange(x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
             stats: CommStats | None = None) -> torch.Tensor:
    """All-to-all of rows: ``send_splits[j]`` rows (consecutive, in rank order) go to rank j of ``group``;
    returns the ``sum(recv_splits)`` rows received, rank i's block at position i. No autograd."""
    import torch.distributed as dist

    x_RD = x_RD.contiguous()
    out = x_RD.new_empty((sum(recv_splits), *x_RD.shape[1:]))
    if stats is None:
        dist.all_to_all_single(out, x_RD, recv_splits, send_splits, group=group)
        return out
    _synchronize(x_RD.device)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x_RD, recv_splits, send_splits, group=group)
    _synchronize(x_RD.device)
    stats.seconds += time.perf_counter() - t0
    stats.calls += 1
    me = dist.get_rank(group)
    row_bytes = math.prod(x_RD.shape[1:]) * x_RD.element_size()  # a buffer may have no rows at all
    stats.bytes_sent += (sum(send_splits) - send_splits[me]) * row_bytes
    stats.bytes_received += (sum(recv_splits) - recv_splits[me]) * row_bytes
    return out


class _AllToAll(torch.autograd.Function):
    """``exchange`` forward; backward, the gradient rows travel back with the splits swapped."""

    @staticmethod
    def forward(ctx, x_RD, send_splits, recv_splits, group, stats):
        ctx.splits, ctx.group, ctx.stats = (send_splits, recv_splits), group, stats
        return exchange(x_RD, send_splits, recv_splits, group, stats)

    @staticmethod
    def backward(ctx, grad_RD):
        send_splits, recv_splits = ctx.splits
        return exchange(grad_RD, recv_splits, send_splits, ctx.group, ctx.stats), None, None, None, None


def all_to_all(x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
               stats: CommStats | None = None) -> torch.Tensor:
    """``exchange`` with autograd: the gradient of the received rows flows back to their senders."""
    return _AllToAll.apply(x_RD, list(send_splits), list(recv_splits), group, stats)


def exchange_counts(tokens_per_expert_E: torch.Tensor, group=None) -> torch.Tensor:
    """(P, L): row p holds how many rows rank p will send to each of this rank's L experts.

    ``tokens_per_expert_E`` are this rank's pairs per global expert; experts are laid out in
    rank order (rank j holds experts j*L .. j*L + L - 1), so the E counts split evenly, L per rank.
    """
    import torch.distributed as dist

    P = dist.get_world_size(group)
    counts_E = tokens_per_expert_E.to(torch.long).contiguous()
    received_E = torch.empty_like(counts_E)
    dist.all_to_all_single(received_E, counts_E, group=group)
    return received_E.view(P, -1)
