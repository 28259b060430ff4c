"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared experts).

Read ``forward`` top to bottom:

    routing = router(x)                                  which experts, with what weights
    y       = dispatch(x, routing, experts)              permute -> experts -> un-permute and combine
    y      += shared_experts(x)                          DeepSeekMoE / Qwen2-MoE, optionally gated
    losses  = balance.LOSS_FUNCTIONS[name](...)          raw, per layer; the weighted sum trains

Every router in ``ROUTERS`` plugs in unchanged. What the config decides is settled at
construction, not in ``forward``: the dispatch comes with its options bound
(``build_dispatch``; a router that mixes tokens, soft MoE, takes ``soft_dispatch``, which alone
reads the (B, S) layout and the padding mask), and expert choice's padded slots
(``RouterOutput.mask_TK``) are honoured by every dispatch and balancing loss.

Two kinds of training state live between optimizer steps, as non-persistent buffers (zero at
every step boundary, where checkpoints are written): the loads for the loss-free bias update
and the assignment counts of the global-batch auxiliary loss. ``finish_step()``, called once
after each optimizer step, consumes and resets both.

The layer is pure PyTorch. Faster versions of the same function sit beside it and are applied
from outside: ``workbench.kernels.cpu.convert`` swaps in fused CPU subclasses (which override
``balance_loss`` and ``reported_losses`` below) and ``workbench.parallel`` gives a layer an
expert-parallel dispatch, a slice of the experts and a ``sum_over_ranks`` that all-reduces.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from workbench.moe import balance
from workbench.moe.dispatch import build_dispatch, dropless_form
from workbench.moe.experts import SwiGLUExperts, SwiGLUMLP
from workbench.moe.routers import build_router
from workbench.moe.types import RouterOutput, RoutingInfo

if TYPE_CHECKING:
    from workbench.moe.config import MoEConfig


def this_process_only(counts_E: torch.Tensor) -> torch.Tensor:
    """``MoELayer.sum_over_ranks`` of a single process: it holds the whole global batch."""
    return counts_E


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
        # Sums a per-expert count over every process that holds part of the global batch, for the
        # statistics meant to span an optimizer step (expert parallelism sets an all-reduce).
        self.sum_over_ranks = this_process_only
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
                padding_mask_BS: torch.Tensor | None = None, *,
                inference: bool = False) -> tuple[torch.Tensor, RoutingInfo]:
        """``inference=True`` (generation, ``MoELM.forward_cached``): the dispatch's dropless form
        (``dispatch.dropless_form``), no balancing losses (``RoutingInfo.losses`` is empty) and no
        training counters, so a decode step does only the work of the function."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(-1)
        routing = self.router(x_TD, token_ids_T)
        dispatch = dropless_form(self.dispatch) if inference else self.dispatch
        y_TD, stats = dispatch(x_TD, routing, self.experts, batch_shape=(B, S), padding_mask_BS=padding_mask_BS)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD

        if inference:
            return y_TD.view(B, S, D), RoutingInfo(routing, stats, {}, routing.logits_TE.new_zeros(()), (B, S))

        if self.training and self.cfg.bias_update_rate > 0:
            self.load_since_update += stats.tokens_per_expert.to(self.load_since_update.dtype)

        step_counts_E = self._count_step_assignments(routing, padding_mask_BS)
        losses, weighted = self.balance_losses(balance.LossInputs(routing, (B, S), padding_mask_BS, step_counts_E))
        return y_TD.view(B, S, D), RoutingInfo(routing, stats, losses, weighted, (B, S))

    def _count_step_assignments(self, routing: RouterOutput,
                                padding_mask_BS: torch.Tensor | None) -> torch.Tensor | None:
        """The global-batch aux loss's f in training: this micro-batch's real assignments (on every
        rank) added to the step's count so far, which is returned. None in micro-batch scope and in
        evaluation, where there is no optimizer step to count over."""
        if self.cfg.aux_loss_scope != "global_batch" or not self.training:
            return None
        mask_T = None if padding_mask_BS is None else padding_mask_BS.reshape(-1)
        counts_E = balance.assignment_counts(routing.expert_ids_TK, self.cfg.num_experts, mask_T, routing.mask_TK)
        self.aux_counts_since_step += self.sum_over_ranks(counts_E)
        return self.aux_counts_since_step

    def balance_losses(self, inputs: balance.LossInputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(every raw loss of ``balance.BALANCE_LOSSES``, their weighted sum). A loss with a weight
        keeps its graph, since the weighted sum trains the router; one without is only reported,
        so it is computed as a value."""
        weights = self.cfg.loss_weights
        losses = {name: self.balance_loss(name, inputs) for name, weight in weights.items() if weight > 0}
        weighted = sum((weights[name] * loss for name, loss in losses.items()),
                       start=inputs.routing.logits_TE.new_zeros(()))
        with torch.no_grad():
            losses.update(self.reported_losses([name for name, weight in weights.items() if weight == 0], inputs))
        return {name: losses[name] for name in weights}, weighted

    def balance_loss(self, name: str, inputs: balance.LossInputs) -> torch.Tensor:
        """One raw balancing loss, with its graph."""
        return balance.LOSS_FUNCTIONS[name](inputs)

    def reported_losses(self, names: list[str], inputs: balance.LossInputs) -> dict[str, torch.Tensor]:
        """The values of the losses that carry no weight (called without a graph)."""
        return {name: self.balance_loss(name, inputs) for name in names}

    @torch.no_grad()
    def finish_step(self) -> None:
        """End of an optimizer step: the loss-free bias update from the loads counted since the last
        call, then both step counters reset. Call it once after every ``optimizer.step()``."""
        cfg = self.cfg
        if cfg.bias_update_rate > 0:
            load_E = self.sum_over_ranks(self.load_since_update)  # every rank makes the same update
            if load_E.sum() > 0:
                balance.update_router_bias(self.router.bias, load_E, cfg.bias_update_rate, cfg.bias_recenter,
                                           cfg.bias_update_rule)
        self.load_since_update.zero_()
        self.aux_counts_since_step.zero_()
