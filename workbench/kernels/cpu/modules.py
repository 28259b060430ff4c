"""Fused subclasses of the readable MoE modules: the same parameters, buffers and function, on the
fused CPU kernels (``ops``).

``convert`` swaps them in by exact class. None of them adds state, so a converted model has the
state dict of the readable one. Each method first checks that its inputs fit its kernel (on the
CPU, the dtypes the kernel takes, outside autocast, the kernels built) and otherwise runs the
readable parent's method: a converted model moved to a GPU, cast to bf16 or built where no C++
compiler exists computes exactly what the readable model computes.

Shape legend: T tokens, N routed rows, D model dim, E experts, K experts per token, C capacity.
"""

from __future__ import annotations

import torch

from workbench.kernels.cpu import ops
from workbench.kernels.cpu.build import load_kernel
from workbench.moe.balance import LossInputs
from workbench.moe.dispatch import sorted_dispatch
from workbench.moe.experts import SwiGLUExperts
from workbench.moe.layer import MoELayer
from workbench.moe.routers import SoftmaxTopKRouter, SwitchRouter
from workbench.moe.types import DispatchStats, RouterOutput


def fp32_on_cpu(*tensors: torch.Tensor) -> bool:
    """The routing kernels' condition: every tensor fp32 on the CPU, and the kernels built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and load_kernel() is not None


def experts_fit(x_ND: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    """The expert kernel's condition: CPU floating-point rows and weights of one dtype, outside
    autocast, and the kernels built. It gives every thread an equal share of the rows, so it
    needs no balanced routing."""
    if x_ND.device.type != "cpu" or not x_ND.dtype.is_floating_point or x_ND.dtype != w_EDH.dtype:
        return False
    return not torch.is_autocast_enabled("cpu") and load_kernel() is not None


# --- routers ----------------------------------------------------------------------------------


class _FusedSoftmaxTopKGate:
    """``gate_and_route`` of the softmax top-k router in one op: gate, softmax, top-k of
    ``probs + bias`` and gates, one pass per token each way (``ops.fused_softmax_topk``)."""

    def gate_and_route(self, x32_TD: torch.Tensor, token_ids_T: torch.Tensor | None) -> RouterOutput:
        if not fp32_on_cpu(x32_TD, self.weight):
            return super().gate_and_route(x32_TD, token_ids_T)
        logits_TE, probs_TE, expert_ids_TK, weights_TK = ops.fused_softmax_topk(
            x32_TD, self.weight, self.bias, self.top_k, self.normalize_topk)
        return RouterOutput(expert_ids_TK, weights_TK, probs_TE, logits_TE)


class FusedSoftmaxTopKRouter(_FusedSoftmaxTopKGate, SoftmaxTopKRouter):
    pass


class FusedSwitchRouter(_FusedSoftmaxTopKGate, SwitchRouter):
    pass


# --- experts and the sorted dispatch ----------------------------------------------------------


class FusedSwiGLUExperts(SwiGLUExperts):
    """Each thread runs the whole expert FFN on its equal share of the rows (``ops.fused_swiglu_experts``)."""

    def forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if not experts_fit(x_ND, self.w1):
            return super().forward_grouped(x_ND, counts)
        return ops.fused_swiglu_experts(x_ND, self.w1, self.w3, self.w2, counts)

    def forward_batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        if not experts_fit(x_ECD, self.w1):
            return super().forward_batched(x_ECD)
        E, C, D = x_ECD.shape
        return ops.fused_swiglu_experts(x_ECD.reshape(E * C, D), self.w1, self.w3, self.w2, [C] * E).view(E, C, D)


def fused_sorted_dispatch(x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts, *,
                          batch_shape: tuple[int, int] | None = None,
                          padding_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchStats]:
    """``dispatch.sorted_dispatch`` with the sort as one counting sort, and permute, experts,
    un-permute and combine as one op (the permutation folded into the expert kernel), for routing
    without padding slots (not expert choice) and experts that are exactly ``FusedSwiGLUExperts``:
    the op computes their function, not that of a subclass with its own ``forward_grouped``."""
    if routing.mask_TK is not None or type(experts) is not FusedSwiGLUExperts or not experts_fit(x_TD, experts.w1):
        return sorted_dispatch(x_TD, routing, experts)
    pairs = ops.sort_pairs_by_expert(routing.expert_ids_TK, experts.num_experts)
    y_TD = ops.fused_sorted_experts(x_TD, routing.weights_TK, experts, pairs)
    return y_TD, DispatchStats.dropless(pairs.tokens_per_expert)


# --- the layer: its balancing losses ----------------------------------------------------------


def _unpadded_fp32_on_cpu(inputs: LossInputs) -> bool:
    routing = inputs.routing
    unpadded = inputs.padding_mask_BS is None and routing.mask_TK is None
    return unpadded and fp32_on_cpu(routing.scores_TE, routing.logits_TE)


class FusedMoELayer(MoELayer):
    """The Switch aux loss in one pass each way (closed-form gradient), and the values of the
    losses that are only reported in one pass together."""

    def balance_loss(self, name: str, inputs: LossInputs) -> torch.Tensor:
        # the micro-batch Switch loss; the global-batch one counts over the whole step
        if name == "aux_loss" and inputs.step_counts_E is None and _unpadded_fp32_on_cpu(inputs):
            return ops.fused_switch_aux_loss(inputs.routing.scores_TE, inputs.routing.expert_ids_TK)
        return super().balance_loss(name, inputs)

    def reported_losses(self, names: list[str], inputs: LossInputs) -> dict[str, torch.Tensor]:
        if not names or not _unpadded_fp32_on_cpu(inputs):
            return super().reported_losses(names, inputs)
        values = ops.balance_loss_values(inputs.routing, inputs.batch_shape[0])
        if inputs.step_counts_E is not None:
            del values["aux_loss"]  # the kernel's is this micro-batch's; the global-batch one counts the step
        fused = {name: values[name] for name in names if name in values}
        return fused | super().reported_losses([name for name in names if name not in fused], inputs)
