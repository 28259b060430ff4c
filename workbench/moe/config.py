"""``MoEConfig``: one MoE feed-forward layer (router, experts, dispatch, load balancing).

It lives beside the MoE code it configures (as OLMo-core keeps each config next to its module).
It validates itself in ``__post_init__``: a bad value raises ``ValueError`` naming the field and
what is allowed, before any tensor is built. What depends on the router type (which options it
honours, its fixed top-k, whether it has a selection bias) is asked of the router class in the
registry (``Router.check_config``), so this file names no router.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar

from workbench.moe.balance import AUX_LOSS_SCOPES, BALANCE_LOSSES, BIAS_UPDATE_RULES
from workbench.moe.dispatch import CAPACITY_SCOPES, DISPATCHES, DROP_POLICIES
from workbench.moe.routers import ROUTERS, router_class
from workbench.validation import check, check_choice, check_int, check_real, is_real

EXPERT_CHOICE_EVAL = ("expert_choice", "token_choice")


@dataclass(kw_only=True)
class MoEConfig:
    """One MoE feed-forward layer: router, experts, dispatch and load balancing."""

    # The fields that name one of a set, and the set (a registry's live keys where there is one):
    # validated here, and listed by each flag's --help (workbench.cli).
    ALLOWED: ClassVar[dict[str, Collection[str]]] = {
        "router": ROUTERS, "dispatch": DISPATCHES, "drop_policy": DROP_POLICIES, "capacity_scope": CAPACITY_SCOPES,
        "aux_loss_scope": AUX_LOSS_SCOPES, "bias_update_rule": BIAS_UPDATE_RULES,
        "expert_choice_eval": EXPERT_CHOICE_EVAL,
    }

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256  # H; fine-grained experts = many experts with a small H

    # --- router -------------------------------------------------------------------------
    router: str = "softmax_topk"
    # renormalise the k selected gates to sum to one (Mixtral); None: the router's default
    # (True, but False for switch, whose gate is the raw probability)
    normalize_topk: bool | None = None
    router_jitter: float = 0.0  # multiplicative router-input noise U(1-eps, 1+eps) in training (Switch)
    num_groups: int = 1  # sigmoid router: experts split into groups (DeepSeek-V3 node-limited routing)
    topk_groups: int = 1  # ... of which this many are kept per token
    route_scale: float = 1.0  # gates are multiplied by this (DeepSeek-V2/V3's routed scaling factor)
    expert_choice_capacity: float | None = None  # expert choice: c experts per token on average; None: top_k
    expert_choice_eval: str = "expert_choice"  # or "token_choice": evaluate causally (top-k of the same scores)
    hash_vocab_size: int = 256  # hash router: rows of the token id -> experts table; >= the vocabulary size
    sinkhorn_iters: int = 10  # sinkhorn router: balancing iterations (fixed, in log space)
    soft_slots_per_expert: int = 1  # soft MoE: slots per expert, per sequence
    cosine_dim: int = 16  # cosine router: dimension of the hypersphere that tokens and experts meet on

    # --- shared experts (DeepSeekMoE / Qwen2-MoE) --------------------------------------
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None  # default: num_shared_experts * expert_hidden
    shared_expert_gate: bool = False  # Qwen2-MoE: scale shared output by sigmoid(x . w)

    # --- dispatch -----------------------------------------------------------------------
    dispatch: str = "sorted"
    # capacity dispatch only: C = ceil(capacity_factor * T * K / E) slots per expert;
    # None: never drop (C = T, the most any expert can receive, since a token picks it once)
    capacity_factor: float | None = 1.25
    drop_policy: str = "position"  # which assignments keep their slot when an expert is full
    # capacity dispatch only. "batch": the batch's T tokens share C slots per expert. "sequence":
    # each sequence has its own C = ceil(capacity_factor * S * K / E), claimed in token order, so a
    # token's drops depend only on earlier tokens of its sequence (needs drop_policy="position")
    capacity_scope: str = "batch"  # who shares an expert's capacity slots; "sequence" drops causally

    # --- load balancing (weights of the raw per-layer losses; 0 disables) --------------
    aux_loss_weight: float = 0.01  # Switch / GShard
    # "global_batch": the aux loss's expert frequencies f are counted over the optimizer step's
    # micro-batches so far (Qiu et al. 2025); its gradient still comes from this micro-batch's P
    aux_loss_scope: str = "micro_batch"  # tokens the aux loss's expert frequencies are counted over
    seq_aux_loss_weight: float = 0.0  # DeepSeek-V3 sequence-wise
    z_loss_weight: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (Wang et al. 2024); 0 disables
    bias_recenter: bool = False  # subtract the mean bias after each update
    # "sign": b += u * sign(e) (Wang et al. 2024); "proportional": b += u * e / mean(load), e the
    # load violation; takes effect only with bias_update_rate > 0
    bias_update_rule: str = "sign"  # loss-free bias step: sign of the load violation, or proportional to it

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "expert_hidden", "num_groups", "topk_groups", "hash_vocab_size",
                     "sinkhorn_iters", "soft_slots_per_expert", "cosine_dim"):
            check_int(name, getattr(self, name), 1)
        check(self.top_k <= self.num_experts, "top_k", f"must be between 1 and num_experts={self.num_experts}",
              self.top_k)
        for name, allowed in self.ALLOWED.items():
            check_choice(name, getattr(self, name), allowed)
        if self.capacity_scope == "sequence":
            check(self.dispatch == "capacity", "capacity_scope",
                  f"'sequence' shares slots per sequence, which only dispatch='capacity' has (dispatch="
                  f"{self.dispatch!r} never drops): leave it 'batch'", self.capacity_scope)
            check(self.drop_policy == "position", "drop_policy",
                  "capacity_scope='sequence' claims slots in token order, which needs drop_policy='position' "
                  "(score priority lets a later token take an earlier one's slot: not causal)", self.drop_policy)
        check(self.normalize_topk in (None, True, False), "normalize_topk", "must be True, False or None",
              self.normalize_topk)
        if self.capacity_factor is not None:
            check(is_real(self.capacity_factor) and math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
                  "capacity_factor", "must be a finite number > 0, or None to never drop", self.capacity_factor)
        check(is_real(self.router_jitter) and 0 <= self.router_jitter < 1, "router_jitter", "must be in [0, 1)",
              self.router_jitter)
        check_real("route_scale", self.route_scale, 0, above=True)
        check(self.num_experts % self.num_groups == 0, "num_groups", f"must divide num_experts={self.num_experts}",
              self.num_groups)
        check(self.topk_groups <= self.num_groups, "topk_groups",
              f"must be between 1 and num_groups={self.num_groups}", self.topk_groups)
        kept_experts = self.topk_groups * (self.num_experts // self.num_groups)
        check(self.top_k <= kept_experts, "top_k",
              f"must be <= the {kept_experts} experts in the topk_groups={self.topk_groups} kept groups", self.top_k)

        check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_expert_hidden is not None:
            check_int("shared_expert_hidden", self.shared_expert_hidden, 1)
            check(self.num_shared_experts >= 1, "shared_expert_hidden",
                  "sizes the shared expert, so it needs num_shared_experts >= 1 (else leave it None)",
                  self.shared_expert_hidden)
        check(not self.shared_expert_gate or self.num_shared_experts >= 1, "shared_expert_gate",
              "gates the shared expert, so it needs num_shared_experts >= 1", self.shared_expert_gate)

        for name in ("aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            check_real(name, getattr(self, name), 0)
        if self.expert_choice_capacity is not None:
            check(is_real(self.expert_choice_capacity) and 0 < self.expert_choice_capacity <= self.num_experts,
                  "expert_choice_capacity", f"must be None or in (0, num_experts={self.num_experts}]",
                  self.expert_choice_capacity)
        router_class(self.router).check_config(self.router, self)

    def router_params(self, d_model: int) -> int:
        """Parameters of one router (they differ by router type); equals the module's count."""
        return router_class(self.router).num_params(d_model, self)

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of each raw balancing loss, keyed as ``RoutingInfo.losses`` is."""
        return {name: getattr(self, f"{name}_weight") for name in BALANCE_LOSSES}

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the (merged) shared expert; 0 when there is none."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_hidden or self.num_shared_experts * self.expert_hidden
