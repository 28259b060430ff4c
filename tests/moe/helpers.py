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


def random_masked_routing(T: int, E: int, K: int, *, generator: torch.Generator | None = None,
                          requires_grad: bool = False) -> RouterOutput:
    """Expert-choice-like routing: each token has 0..K real slots (some tokens none, some all K).

    The padding slots are made hostile on purpose: non-zero weights and expert ids that repeat
    real ones, so a dispatch that reads them gives a different answer."""
    routing = random_routing(T, E, K, generator=generator)
    mask = torch.rand(T, K, generator=generator) < 0.6
    mask[0] = False  # a token no expert took
    mask[1] = True  # a token with every slot real
    ids = routing.expert_ids_TK.clone()
    ids[~mask] = ids[:, :1].expand(T, K)[~mask]  # padding points at the token's first expert
    weights = routing.weights_TK.detach().clone().requires_grad_(requires_grad)
    return RouterOutput(ids, weights, routing.scores_TE, routing.logits_TE, mask)
