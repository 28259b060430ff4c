"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared experts).

Every router in ``ROUTERS`` plugs in unchanged. What the config decides is settled at
construction, not in ``forward``: the dispatch comes with its options bound
(``build_dispatch``; a router that mixes tokens, soft MoE, takes ``soft_dispatch``, which alone
reads the (B, S) layout and the padding mask), and expert choice's padded slots
(``RouterOutput.mask_TK``) are honoured by every dispatch and balancing loss.

Two kinds of training state live between optimizer steps, as non-persistent buffers (zero at
every step boundary, where checkpoints are written): the loads for the loss-free bias update
and the assignment counts of the global-batch auxiliary loss. ``finish_step()``, called once
after each optimizer step, consumes and resets both.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from workbench.moe import balance, cpu_kernels
from workbench.moe.dispatch import DispatchStats, build_dispatch
from workbench.moe.experts import SwiGLUExperts, SwiGLUMLP
from workbench.moe.routers import RouterOutput, build_router

if TYPE_CHECKING:
    from workbench.moe.config import MoEConfig


@dataclass
class RoutingInfo:
    """What one MoE layer did with one batch; ``workbench.moe.metrics`` turns it into numbers."""

    router_output: RouterOutput  # what the router decided for this batch
    stats: DispatchStats
    losses: dict[str, torch.Tensor]  # raw, unweighted: aux_loss, seq_aux_loss, z_loss
    weighted_loss: torch.Tensor  # sum of the losses times their configured weights
    batch_shape: tuple[int, int]  # (B, S), to view the (T, ...) tensors per sequence

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self.stats.tokens_per_expert


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(d_model, cfg)
        self.experts = SwiGLUExperts(cfg.num_experts, d_model, cfg.expert_hidden)
        self.dispatch = build_dispatch(cfg, mixes_tokens=self.router.mixes_tokens)
        self.shared_experts = SwiGLUMLP(d_model, cfg.shared_hidden) if cfg.shared_hidden else None
        # Qwen2-MoE gates the shared expert per token with sigmoid(x . w_g).
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        # Assignments counted since the last bias update (loss-free balancing). Training-only state
        # that is zero at every optimizer step boundary (where checkpoints are written), so it is
        # not part of the state dict: a plain state dict loads with strict=True.
        self.register_buffer("load_since_update", torch.zeros(cfg.num_experts), persistent=False)
        # Real assignments per expert over the micro-batches of this optimizer step so far: the f of
        # the global-batch aux loss. The same life cycle as load_since_update, but padding tokens are
        # left out (as the loss leaves them out), and it counts whatever the loss weight.
        self.register_buffer("aux_counts_since_step", torch.zeros(cfg.num_experts, dtype=torch.long),
                             persistent=False)

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor | None = None,
                padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingInfo]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(-1)
        routing = self.router(x_TD, token_ids_T)
        y_TD, stats = self.dispatch(x_TD, routing, self.experts, batch_shape=(B, S), padding_mask_BS=padding_mask_BS)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD

        if self.training and self.cfg.bias_update_rate > 0:
            self.load_since_update += stats.tokens_per_expert.to(self.load_since_update.dtype)

        losses, weighted = self._balance_losses(routing, (B, S), padding_mask_BS)
        info = RoutingInfo(routing, stats, losses, weighted, (B, S))
        return y_TD.view(B, S, D), info

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """This micro-batch's assignment counts over every process that holds part of the global batch.

        One process holds all of it, so they are returned as they are; the expert-parallel layer
        (``workbench.parallel.ExpertParallelMoELayer``) sums them over its ranks here.
        """
        return counts_E

    def _balance_losses(self, routing: RouterOutput, batch_shape: tuple[int, int],
                        padding_mask_BS: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        B, S = batch_shape
        mask_T = None if padding_mask_BS is None else padding_mask_BS.reshape(-1)
        slot_mask_TK = routing.mask_TK
        cfg = self.cfg
        if cfg.aux_loss_scope == "global_batch" and self.training:
            counts_E = balance.assignment_counts(routing.expert_ids_TK, cfg.num_experts, mask_T, slot_mask_TK)
            self.aux_counts_since_step += self.global_counts(counts_E)
            aux_loss = partial(balance.global_batch_aux_loss, routing.scores_TE, self.aux_counts_since_step, mask_T)
        else:  # micro-batch scope, and evaluation, where there is no optimizer step to count over
            aux_loss = partial(balance.switch_aux_loss, routing.scores_TE, routing.expert_ids_TK, mask_T, slot_mask_TK)
        compute = {
            "aux_loss": aux_loss,
            "seq_aux_loss": lambda: balance.sequence_aux_loss(
                routing.scores_TE.view(B, S, -1), routing.expert_ids_TK.view(B, S, -1), padding_mask_BS,
                None if slot_mask_TK is None else slot_mask_TK.view(B, S, -1)),
            "z_loss": lambda: balance.router_z_loss(routing.logits_TE, mask_T),
        }
        losses, weighted = {}, routing.logits_TE.new_zeros(())
        for name, weight in cfg.loss_weights.items():
            if weight > 0:
                losses[name] = compute[name]()
                weighted = weighted + weight * losses[name]
        # Every raw loss is reported; the unweighted ones need no graph. On CPU one kernel pass
        # gives their values (not the global-batch aux, which counts over the whole step).
        unweighted = [name for name, weight in cfg.loss_weights.items() if weight == 0]
        fused = {}
        if unweighted and cpu_kernels.balance_loss_values_apply(routing, padding_mask_BS):
            fused = cpu_kernels.balance_loss_values(routing, B)
            if cfg.aux_loss_scope == "global_batch" and self.training:
                del fused["aux_loss"]
        with torch.no_grad():
            for name in unweighted:
                losses[name] = fused[name] if name in fused else compute[name]()
        return {name: losses[name] for name in cfg.loss_weights}, weighted

    @torch.no_grad()
    def finish_step(self) -> None:
        """End of an optimizer step: the loss-free bias update from the loads counted since the last
        call, then both step counters reset. Call it once after every ``optimizer.step()``."""
        cfg = self.cfg
        if cfg.bias_update_rate > 0 and self.load_since_update.sum() > 0:
            balance.update_router_bias(self.router.bias, self.load_since_update, cfg.bias_update_rate,
                                       cfg.bias_recenter, cfg.bias_update_rule)
        self.load_since_update.zero_()
        self.aux_counts_since_step.zero_()
