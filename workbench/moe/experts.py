"""Experts: SwiGLU feed-forward networks with their weights stacked along a leading expert axis.

    expert_e(x) = (silu(x W1_e) * (x W3_e)) W2_e          (Shazeer 2020, "GLU Variants")

Stacking (``w1``, ``w3``: E x D x H, ``w2``: E x H x D) lets a dispatch run all experts with
one grouped GEMM, and converts to other layouts (Hugging Face, MindSpore, checkpoints) by plain
transposes and reshapes.

Shape legend: N routed rows (token-expert pairs), D model dim, H expert hidden, E experts, C capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands here (torch 2.8+).

    Its kernels need every non-unit stride to be a multiple of 16 bytes; on CUDA they take
    bf16 only (SM >= 80), on CPU fp32 and bf16.
    """
    if not _HAS_GROUPED_MM or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16:
            return False
    elif a.device.type != "cpu" or a.dtype not in (torch.float32, torch.bfloat16):
        return False
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for t in (a, b) for s in t.stride())


def _grouped_mm_forward(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts: list[int],
                        offsets_E: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_ok(x_NK, w_EKM):
        return F.grouped_mm(x_NK, w_EKM, offs=offsets_E)
    out_NM = x_NK.new_empty(x_NK.shape[0], w_EKM.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_NK[start:start + n], w_EKM[e], out=out_NM[start:start + n])
        start += n
    return out_NM


def _grouped_mm_weight_grad(x_NK: torch.Tensor, grad_NM: torch.Tensor, counts: list[int],
                            offsets_E: torch.Tensor) -> torch.Tensor:
    """sum over each group's rows of x^T grad: (E, K, M); zero for an empty group."""
    x_KN = x_NK.t()
    if _grouped_mm_ok(x_KN, grad_NM):
        return F.grouped_mm(x_KN, grad_NM, offs=offsets_E)
    grad_w = x_NK.new_zeros(len(counts), x_NK.shape[1], grad_NM.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_KN[:, start:start + n], grad_NM[start:start + n], out=grad_w[e])
        start += n
    return grad_w


class _GroupedMatmul(torch.autograd.Function):
    """``out[rows of group e] = x[rows of group e] @ w[e]``, rows grouped contiguously by ``counts``.

    A Function of our own rather than F.grouped_mm's autograd: its backward rejects the
    non-contiguous gradients autograd sometimes hands over, and the loop fallback must share
    the same backward.
    """

    @staticmethod
    def forward(ctx, x_NK, w_EKM, counts, offsets_E):
        ctx.save_for_backward(x_NK, w_EKM, offsets_E)
        ctx.counts = counts
        return _grouped_mm_forward(x_NK, w_EKM, counts, offsets_E)

    @staticmethod
    def backward(ctx, grad_NM):
        x_NK, w_EKM, offsets_E = ctx.saved_tensors
        grad_NM = grad_NM.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_mm_forward(grad_NM, w_EKM.transpose(1, 2), ctx.counts, offsets_E)
        if ctx.needs_input_grad[1]:
            grad_w = _grouped_mm_weight_grad(x_NK, grad_NM, ctx.counts, offsets_E)
        return grad_x, grad_w, None, None


def grouped_matmul(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Multiply each contiguous block of rows of ``x`` by its group's matrix.

    ``counts[e]`` rows (in order) belong to group ``e`` and ``sum(counts) == len(x)``. Uses
    ``torch.nn.functional.grouped_mm`` where it exists and fits, a loop of ``mm`` elsewhere.
    Under autocast both operands take the autocast dtype, as ``torch.mm`` would.
    """
    device = x_NK.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x_NK, w_EKM = x_NK.to(dtype), w_EKM.to(dtype)
    offsets_E = torch.tensor(counts, device=x_NK.device).cumsum(0).to(torch.int32)
    return _GroupedMatmul.apply(x_NK, w_EKM, counts, offsets_E)


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts with stacked weights; three ways to run them, one function.

    Under expert parallelism a layer holds a slice of them: experts ``first_expert ..
    first_expert + num_experts - 1`` of the layer (``workbench.parallel.shard_experts``).
    """

    first_expert: int = 0  # the layer-wide index of this module's expert 0

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # gate projection
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # up projection
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # down projection
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)

    def forward_one(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the readable reference."""
        return (F.silu(x_ND @ self.w1[e]) * (x_ND @ self.w3[e])) @ self.w2[e]

    def forward_grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert, ``counts[e]`` of them for expert e: one grouped GEMM per weight matrix."""
        gate_NH = grouped_matmul(x_ND, self.w1, counts)
        up_NH = grouped_matmul(x_ND, self.w3, counts)
        return grouped_matmul(F.silu(gate_NH) * up_NH, self.w2, counts)

    def forward_batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """A fixed-capacity buffer, C rows per expert: batched matmuls (GShard's layout)."""
        return torch.bmm(F.silu(torch.bmm(x_ECD, self.w1)) * torch.bmm(x_ECD, self.w3), self.w2)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}"


class SwiGLUMLP(nn.Module):
    """The dense SwiGLU FFN (LLaMA's MLP): dense layers, shared experts and the baselines."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
