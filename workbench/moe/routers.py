"""Routers: which experts each token goes to, and with what weight.

Every router follows one contract, ``router(x_TD, token_ids_T=None) -> RouterOutput``, so the MoE
layer never branches on the router type, and one registry (``ROUTERS``) selects them by name.
Routing maths runs in fp32, also under bf16 autocast: small logit differences decide the top-k,
and the softmax / sigmoid of bf16 logits would change which experts win.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import MoEConfig


@dataclass
class RouterOutput:
    expert_ids_TK: torch.Tensor  # long: the K experts chosen for each token
    weights_TK: torch.Tensor  # fp32: combine weights of those experts
    scores_TE: torch.Tensor  # fp32: probabilities (softmax) or affinities (sigmoid) of every expert
    logits_TE: torch.Tensor  # fp32: raw router logits (the z-loss reads these)


class Router(nn.Module):
    """Base class: a linear gate ``logits = x W_r`` computed in fp32, then ``route``."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(self.prepare_input(x_TD).float(), self.weight.float())
            return self.route(logits_TE)

    def prepare_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        raise NotImplementedError


class BiasedTopKRouter(Router):
    """A router that picks experts by ``score + bias``.

    The bias is the auxiliary-loss-free balancing state (Wang et al. 2024, arXiv:2408.15664): it
    is a buffer, not a parameter; gradients never touch it; it only changes *which* experts are
    selected, never the gate values; ``workbench.moe.balance.update_router_bias`` moves it at
    the optimizer step. It stays zero (and inert) unless that update runs.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.register_buffer("bias", torch.zeros(cfg.num_experts))

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Indices of the K experts with the highest biased score, shape (T, K)."""
        return torch.topk(scores_TE + self.bias, self.top_k, dim=-1, sorted=False).indices


class SoftmaxTopKRouter(BiasedTopKRouter):
    """Softmax over all experts, keep the top-k (GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024).

    ``normalize_topk`` renormalises the kept probabilities to sum to one, which equals a softmax
    over the k selected logits (Mixtral, Qwen3-MoE). Without it the weights are the raw
    probabilities (Switch, Qwen2-MoE, DeepSeek-V2). With k=1 and renormalising, every gate is
    exactly 1 and the router learns only from the auxiliary losses.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.normalize_topk = cfg.normalize_topk

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK = self.select(probs_TE)
        weights_TK = probs_TE.gather(1, expert_ids_TK)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(expert_ids_TK, weights_TK, probs_TE, logits_TE)


class SwitchRouter(SoftmaxTopKRouter):
    """Top-1 routing with the raw softmax probability as gate (Switch Transformer, Fedus et al. 2021).

    ``router_jitter`` multiplies the router input by U(1 - eps, 1 + eps) noise during training,
    the Switch paper's "jitter" for exploration (section 2.4).
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.normalize_topk = False
        self.jitter = cfg.router_jitter

    def prepare_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return x_TD * noise
        return x_TD


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5).

        H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)     (training only)
        G(x)   = Softmax(KeepTopK(H(x), k))

    so the gates are a softmax over the k kept noisy logits. ``scores_TE`` is the softmax of
    the clean logits, which the balancing losses and metrics read.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        # Zero init: the noise starts at softplus(0) = 0.69 and is learned from there.
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, d_model))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x32 = x_TD.float()
            logits_TE = F.linear(x32, self.weight.float())
            noisy_TE = logits_TE
            if self.training:
                noise_std_TE = F.softplus(F.linear(x32, self.noise_weight.float()))
                noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
            top_logits_TK, expert_ids_TK = torch.topk(noisy_TE, self.top_k, dim=-1, sorted=False)
            weights_TK = top_logits_TK.softmax(dim=-1)
            return RouterOutput(expert_ids_TK, weights_TK, logits_TE.softmax(dim=-1), logits_TE)


class SigmoidRouter(BiasedTopKRouter):
    """DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv:2412.19437, section 2.1.2, eq. 12-16).

        s_i   = sigmoid(u . e_i)                                   affinity of expert i
        keep  = top-k over (s_i + b_i), within the top ``topk_groups`` of ``num_groups``
                groups, a group scored by the sum of its two highest biased affinities
        g_i   = route_scale * s_i / sum_{j in keep} s_j            gates from the *unbiased* s

    The bias ``b`` comes from auxiliary-loss-free balancing; it selects, it never weights.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.num_groups = cfg.num_groups
        self.topk_groups = cfg.topk_groups
        self.route_scale = cfg.route_scale
        self.normalize_topk = cfg.normalize_topk

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        biased_TE = scores_TE + self.bias
        if self.num_groups > 1:
            biased_TE = self._mask_to_kept_groups(biased_TE)
        return torch.topk(biased_TE, self.top_k, dim=-1, sorted=False).indices

    def _mask_to_kept_groups(self, biased_TE: torch.Tensor) -> torch.Tensor:
        T, E = biased_TE.shape
        grouped_TGe = biased_TE.view(T, self.num_groups, E // self.num_groups)
        # A group's score is the sum of its top-2 experts (top-1 when a group has one expert).
        per_group = min(2, E // self.num_groups)
        group_score_TG = grouped_TGe.topk(per_group, dim=-1).values.sum(dim=-1)
        kept_groups_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_groups_TG, True)
        expert_mask_TE = group_mask_TG.repeat_interleave(E // self.num_groups, dim=1)
        return biased_TE.masked_fill(~expert_mask_TE, float("-inf"))

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        scores_TE = logits_TE.sigmoid()
        expert_ids_TK = self.select(scores_TE)
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(expert_ids_TK, weights_TK * self.route_scale, scores_TE, logits_TE)


ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "sigmoid": SigmoidRouter,
}


def build_router(d_model: int, cfg: MoEConfig) -> Router:
    if cfg.router not in ROUTERS:
        raise ValueError(f"router={cfg.router!r} is invalid: allowed values are {', '.join(ROUTERS)}")
    return ROUTERS[cfg.router](d_model, cfg)
