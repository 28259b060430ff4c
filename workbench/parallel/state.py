"""Checkpoint state of a parallel run, in the single-process layout, so any number of ranks resumes it.

Saving: every expert tensor (the weights and their AdamW moments) is gathered from the
expert-parallel ranks and concatenated along the expert axis into the full ``(E, ...)`` tensor
one process would hold, on rank 0, which writes the ordinary checkpoint file
(``workbench.train.checkpoint``). Replicated tensors are the same on every rank; rank 0's are taken.

Loading: a full-size expert tensor meets a rank that holds experts ``lo .. hi - 1`` and is sliced
to them: the layer's ``load_state_dict`` pre-hook does it for the weights
(``parallelize_layer``), ``slice_optimizer_state`` for the moments. A checkpoint written by
one process thus resumes on P ranks, and one written by P ranks resumes in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.parallel.context import ParallelContext
from workbench.parallel.layer import expert_parallel_layers


def _expert_slices(model: nn.Module) -> dict[int, tuple[int, int, int]]:
    """id(local expert parameter) -> (lo, hi, E): where its slice sits in the full tensor."""
    out = {}
    for layer in expert_parallel_layers(model):
        for p in layer.experts.parameters():
            lo = layer.experts.first_expert
            out[id(p)] = (lo, lo + layer.experts.num_experts, layer.cfg.num_experts)
    return out


def _gather_along_experts(local: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The expert-parallel group's slices of one tensor, concatenated in rank order (every group rank gets it)."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(ctx.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.ep_group)
    return torch.cat(parts, dim=0)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
               ctx: ParallelContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(model state dict, optimizer state dict) in the single-process layout, on rank 0; None elsewhere.

    Collective over the expert-parallel group of rank 0 (the other groups hold copies of the same
    experts and skip it): call it on every rank.
    """
    model_state = model.state_dict()
    slices = _expert_slices(model)
    if not slices:
        return (model_state, optimizer.state_dict()) if ctx.is_main else None
    if ctx.dp_rank != 0:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():  # model order: the same on every rank, so the gathers pair up
        if id(p) in slices:
            model_state[names[id(p)]] = _gather_along_experts(p.detach(), ctx)
    optim_state = optimizer.state_dict()
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in optim_state["state"].items():
        p = ordered[index]
        if id(p) in slices:
            values = {k: _gather_along_experts(v, ctx) if _is_slice_of(v, p) else v for k, v in values.items()}
        state[index] = values
    optim_state = {**optim_state, "state": state}
    return (model_state, optim_state) if ctx.is_main else None


def _is_slice_of(value: Any, p: torch.Tensor) -> bool:
    # per-element optimizer state (AdamW's moments) has the parameter's shape; step counters are scalars
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape


def slice_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
                          ) -> dict[str, Any]:
    """``state_dict`` (an optimizer state dict) with full-size expert moments cut to this rank's slice.

    Parameters are matched as ``Optimizer.load_state_dict`` matches them, by position in the
    groups, which is the same for any number of ranks (the model has the same parameters).
    """
    slices = _expert_slices(model)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    position = {saved: ordered[k] for k, saved in enumerate(saved_ids) if k < len(ordered)}
    state = {}
    for index, values in state_dict["state"].items():
        p = position.get(index)
        if p is not None and id(p) in slices:
            lo, hi, E = slices[id(p)]
            values = {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == E
                      and v.shape[1:] == p.shape[1:] and p.shape[0] != E else v for k, v in values.items()}
        state[index] = values
    return {**state_dict, "state": state}


def install_optimizer_slicing(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` take single-process (full-size) expert moments."""
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: slice_optimizer_state(model, opt, sd))
