"""Shared test helpers: random routing and gradient comparison."""

from __future__ import annotations

import torch

from workbench.moe import RouterOutput


def random_routing(T: int, E: int, K: int, *, generator: torch.Generator | None = None,
                   requires_grad: bool = False) -> RouterOutput:
    """K distinct experts per token with positive weights, as every top-k router produces."""
    logits = torch.randn(T, E, generator=generator)
    ids = torch.rand(T, E, generator=generator).argsort(dim=1)[:, :K]
    weights = torch.rand(T, K, generator=generator) + 0.1
    weights.requires_grad_(requires_grad)
    return RouterOutput(ids, weights, logits.softmax(-1), logits)


def grads(outputs: torch.Tensor, grad_out: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, params, grad_out, allow_unused=False))
