"""Load balancing: auxiliary losses and the auxiliary-loss-free bias update, as free functions.

The losses are raw and per layer (the model weights them and averages over layers, so one
layer's imbalance cannot cancel another's, as it can when routing is concatenated across
layers). They are normalised so that perfectly uniform routing scores exactly 1.

``LOSS_FUNCTIONS`` at the end is the one table of the losses a layer reports, by the name each
has everywhere (``BALANCE_LOSSES``): ``RoutingInfo.losses`` keys, ``MoEConfig.<name>_weight``
fields, the metrics log's ``raw/<name>`` columns and the MindSpore model's outputs.

Shape legend: T tokens, B sequences, S positions, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.moe.types import RouterOutput
from workbench.validation import check_choice

# Over which tokens the Switch loss's expert frequencies f_i are counted (MoEConfig.aux_loss_scope).
AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
# How the loss-free bias moves with the load violation (MoEConfig.bias_update_rule).
BIAS_UPDATE_RULES = ("sign", "proportional")


def _masked_mean(values_T: torch.Tensor, mask_T: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    if mask_T is None:
        return values_T.mean(dim=dim)
    mask = mask_T.to(values_T.dtype)
    while mask.dim() < values_T.dim():
        mask = mask.unsqueeze(-1)
    return (values_T * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def _as_distribution(scores_TE: torch.Tensor) -> torch.Tensor:
    """Per-token distribution over experts: softmax probabilities pass unchanged; sigmoid
    affinities are normalised to sum to one, as DeepSeek-V3 does (eq. 19)."""
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def _assignment_fraction(expert_ids_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None,
                         slot_mask_TK: torch.Tensor, dim: int) -> torch.Tensor:
    """Share of the real assignments (slot mask True, token mask True) that go to each expert."""
    slots = slot_mask_TK if mask_T is None else slot_mask_TK & mask_T.unsqueeze(-1)
    one_hot_TE = (F.one_hot(expert_ids_TK, num_experts) * slots.unsqueeze(-1)).sum(dim=-2).float()
    return one_hot_TE.sum(dim=dim) / one_hot_TE.sum(dim=(dim, -1)).clamp(min=1).unsqueeze(-1)


def switch_aux_loss(scores_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                    mask_T: torch.Tensor | None = None, slot_mask_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Switch / GShard load-balancing loss (Fedus et al. 2021, eq. 4-6; Lepikhin et al. 2020).

        L = E * sum_i f_i * P_i
        f_i = (1 / (T K)) * sum_t sum_k 1[e_tk = i]      fraction of assignments to expert i
        P_i = (1 / T) * sum_t p_ti                        mean router probability of expert i

    f is not differentiable; the gradient flows through P and pushes probability away from
    overloaded experts. Uniform routing gives L = 1 (dividing f by K keeps that true for top-k).
    ``mask_T`` (True = real token) leaves padding out of both f and P. ``slot_mask_TK`` (True =
    real assignment; expert choice) leaves padding slots out of f, whose denominator becomes
    the number of real assignments: f is then exactly uniform for expert choice, and L = 1.
    """
    T, E = scores_TE.shape
    K = expert_ids_TK.shape[1]
    if slot_mask_TK is None and mask_T is None:
        # the common case in one counting pass: f_i = (assignments to i) / (T K)
        f_E = torch.bincount(expert_ids_TK.flatten(), minlength=E).to(scores_TE.dtype) / max(1, T * K)
    elif slot_mask_TK is None:
        one_hot_TE = F.one_hot(expert_ids_TK, E).sum(dim=1).to(scores_TE.dtype)
        f_E = _masked_mean(one_hot_TE, mask_T) / K
    else:
        f_E = _assignment_fraction(expert_ids_TK, E, mask_T, slot_mask_TK, dim=0).to(scores_TE.dtype)
    P_E = _masked_mean(_as_distribution(scores_TE), mask_T)
    return E * torch.sum(f_E * P_E)


def assignment_counts(expert_ids_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None = None,
                      slot_mask_TK: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) long: the real assignments of each expert, the numerator of ``switch_aux_loss``'s f.

    Padding tokens (``mask_T`` False) and padding slots (``slot_mask_TK`` False, expert choice)
    are left out, as ``switch_aux_loss`` leaves them out of f; the sum is the number of real
    assignments, f's denominator.
    """
    real_TK = slot_mask_TK
    if mask_T is not None:
        token_TK = mask_T.unsqueeze(-1).expand_as(expert_ids_TK)
        real_TK = token_TK if real_TK is None else real_TK & token_TK
    ids = expert_ids_TK.flatten() if real_TK is None else expert_ids_TK[real_TK]
    return torch.bincount(ids, minlength=num_experts)


def global_batch_aux_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor,
                          mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Global-batch load-balancing loss (Qiu et al. 2025, "Demons in the Detail: On Implementing
    Load Balancing Loss for Training Specialized Mixture-of-Expert Models", arXiv:2501.11873).

        L = E * sum_i f_i * P_i
        f_i = c_i / sum_j c_j        c_i: assignments to expert i over the global batch
        P_i = (1 / T) * sum_t p_ti   mean router probability of expert i, this micro-batch only

    The Switch loss (``switch_aux_loss``) computed with f counted over more tokens than the
    micro-batch: a micro-batch of one domain may then route unevenly, as long as the global
    batch is balanced, which Qiu et al. find lets experts specialise (and improves the LM loss).
    f is not differentiable; P carries the gradient, and only for the current micro-batch.

    ``counts_E`` are the assignment counts (``assignment_counts``, padding left out) summed
    over the micro-batches of the current optimizer step seen so far, this one included, as
    Megatron-LM's ``global_aux_loss`` keeps them (a running buffer reset after each optimizer
    step): under gradient accumulation micro-batch m sees the frequencies of micro-batches
    1..m, and only the last one the whole step's. Counts of this micro-batch alone give
    exactly ``switch_aux_loss``. ``mask_T`` (True = real token) leaves padding out of P.
    ``sum_j c_j`` is the number of real assignments, so no separate token count is needed.
    """
    E = scores_TE.shape[1]
    f_E = counts_E.to(scores_TE.dtype) / counts_E.sum().clamp(min=1).to(scores_TE.dtype)
    P_E = _masked_mean(_as_distribution(scores_TE), mask_T)
    return E * torch.sum(f_E * P_E)


def sequence_aux_loss(scores_BSE: torch.Tensor, expert_ids_BSK: torch.Tensor,
                      mask_BS: torch.Tensor | None = None, slot_mask_BSK: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (arXiv:2412.19437, eq. 17-20).

        L = sum_i f_i * P_i, per sequence, averaged over the batch
        f_i = E / (K S) * sum_t 1[expert i in the top-k of token t]
        P_i = (1 / S) * sum_t s'_ti,   s'_ti = s_ti / sum_j s_tj

    It balances every sequence, not only the batch. Uniform routing gives L = 1. With
    ``slot_mask_BSK`` (expert choice) K S becomes the sequence's number of real assignments.
    """
    B, S, E = scores_BSE.shape
    K = expert_ids_BSK.shape[-1]
    if slot_mask_BSK is None and mask_BS is None:
        # per-sequence counts in one pass: bin b * E + e holds sequence b's assignments to e
        bins = expert_ids_BSK + torch.arange(B, device=expert_ids_BSK.device).view(B, 1, 1) * E
        counts_BE = torch.bincount(bins.flatten(), minlength=B * E).view(B, E).to(scores_BSE.dtype)
        f_BE = counts_BE * (E / (K * max(1, S)))
    elif slot_mask_BSK is None:
        one_hot_BSE = F.one_hot(expert_ids_BSK, E).sum(dim=2).to(scores_BSE.dtype)
        f_BE = _masked_mean(one_hot_BSE, mask_BS, dim=1) * (E / K)
    else:
        f_BE = _assignment_fraction(expert_ids_BSK, E, mask_BS, slot_mask_BSK, dim=1).to(scores_BSE.dtype) * E
    P_BE = _masked_mean(_as_distribution(scores_BSE), mask_BS, dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): L_z = (1/T) * sum_t (log sum_i exp(x_ti))^2.

    Penalises large router logits, which keeps the router's softmax numerically stable.
    """
    return _masked_mean(torch.logsumexp(logits_TE, dim=-1).square(), mask_T)


@torch.no_grad()
def update_router_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float,
                       recenter: bool = False, rule: str = "sign") -> torch.Tensor:
    """Auxiliary-loss-free balancing step (Wang et al. 2024, arXiv:2408.15664, Algorithm 1), in place.

        e_i = mean_j(c_j) - c_i              load violation of expert i over the last step
        b_i <- b_i + u * sign(e_i)            rule="sign": raise underloaded experts, lower overloaded ones
        b_i <- b_i + u * e_i / mean_j(c_j)    rule="proportional": move by the relative violation

    Wang et al. also try a proportional update (b_i += u * e_i) and find the sign rule balances
    better. Ours divides e_i by the mean load so that u means the same at any batch size (an
    expert 10% over its share moves by 0.1 u whether a step has 1k or 1M tokens).

    Call it after the optimizer step with the loads ``c`` counted since the previous call;
    never inside forward. ``recenter`` subtracts the mean bias afterwards, which changes no
    selection (top-k is shift invariant) but keeps the bias from drifting.
    """
    check_choice("bias_update_rule", rule, BIAS_UPDATE_RULES)
    load = tokens_per_expert_E.to(bias_E.dtype)
    violation = load.mean() - load
    if rule == "sign":
        bias_E.add_(rate * torch.sign(violation))
    else:
        # no load at all: every violation is 0, and so is the step (not 0 / 0)
        bias_E.add_(rate * violation / load.mean().clamp(min=torch.finfo(load.dtype).tiny))
    if recenter:
        bias_E.sub_(bias_E.mean())
    return bias_E


# --- the losses of one layer, by name --------------------------------------------------------


@dataclass
class LossInputs:
    """What one layer's balancing losses read for one micro-batch."""

    routing: RouterOutput
    batch_shape: tuple[int, int]  # (B, S): the sequence-wise loss views the T tokens per sequence
    padding_mask_BS: torch.Tensor | None  # True for real tokens; padding is left out of every loss
    # The global-batch aux loss (MoEConfig.aux_loss_scope="global_batch", in training): the real
    # assignments of the optimizer step so far, over every rank. None: f counts this micro-batch.
    step_counts_E: torch.Tensor | None = None

    @property
    def mask_T(self) -> torch.Tensor | None:
        return None if self.padding_mask_BS is None else self.padding_mask_BS.reshape(-1)


def layer_aux_loss(inputs: LossInputs) -> torch.Tensor:
    """The Switch loss over this micro-batch, or over the step so far (``global_batch_aux_loss``)."""
    routing = inputs.routing
    if inputs.step_counts_E is not None:
        return global_batch_aux_loss(routing.scores_TE, inputs.step_counts_E, inputs.mask_T)
    return switch_aux_loss(routing.scores_TE, routing.expert_ids_TK, inputs.mask_T, routing.mask_TK)


def layer_sequence_aux_loss(inputs: LossInputs) -> torch.Tensor:
    routing, (B, S) = inputs.routing, inputs.batch_shape
    slot_mask_BSK = None if routing.mask_TK is None else routing.mask_TK.view(B, S, -1)
    return sequence_aux_loss(routing.scores_TE.view(B, S, -1), routing.expert_ids_TK.view(B, S, -1),
                             inputs.padding_mask_BS, slot_mask_BSK)


def layer_z_loss(inputs: LossInputs) -> torch.Tensor:
    return router_z_loss(inputs.routing.logits_TE, inputs.mask_T)


LOSS_FUNCTIONS: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "aux_loss": layer_aux_loss,  # Switch / GShard (or global-batch) load balancing
    "seq_aux_loss": layer_sequence_aux_loss,  # DeepSeek-V3 sequence-wise
    "z_loss": layer_z_loss,  # ST-MoE router z-loss
}
BALANCE_LOSSES = tuple(LOSS_FUNCTIONS)
