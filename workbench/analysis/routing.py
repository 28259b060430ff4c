"""Routing traces: which experts each token of a text goes to, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.data import ByteTokenizer
from workbench.model import MoELM
from workbench.moe import RoutingInfo


@dataclass
class RoutingTrace:
    token_strings: list[str]  # one printable string per byte token
    layers: list[int]  # model layer index of each MoE layer
    routing: list[RoutingInfo]  # one per MoE layer, for a single sequence (T = len(token_strings))

    def layer(self, layer: int) -> RoutingInfo:
        return self.routing[self.layers.index(layer)]


@torch.no_grad()
def route_text(model: MoELM, text: str, tokenizer: ByteTokenizer | None = None) -> RoutingTrace:
    """Run ``text`` through ``model`` (evaluation mode, no noise) and keep every layer's routing."""
    tokenizer = tokenizer or ByteTokenizer()
    ids = tokenizer.encode(text)[: model.cfg.seq_len]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = model(torch.tensor([ids], device=device))
    model.train(was_training)
    return RoutingTrace(tokenizer.token_strings(ids), model.cfg.moe_layers, out.routing)


def domain_specialization(matrix_DE: torch.Tensor) -> torch.Tensor:
    """How much more often each domain uses each expert than the average token does.

    ``matrix_DE[d, e]`` counts domain d's assignments to expert e. The result is
    P(e | d) / P(e): 1 means the expert serves the domain no more than its overall share,
    above 1 means it specialises in it (the lift used in OLMoE-style specialization plots).
    """
    m = matrix_DE.double()
    p_e_given_d = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    p_e = m.sum(dim=0) / m.sum().clamp(min=1)
    return p_e_given_d / p_e.clamp(min=1e-12)


def domain_expert_mutual_information(matrix_DE: torch.Tensor) -> float:
    """Mutual information I(domain; expert) in bits, from domain x expert assignment counts.

        I = sum_{d,e} p(d, e) log2( p(d, e) / (p(d) p(e)) )

    0 when every domain uses the experts in the same proportions (no specialization); at most
    min(log2 D, log2 E), reached when each domain has experts of its own. One number per layer,
    to compare how much routing depends on the domain across methods (Qiu et al. 2025 compare
    micro- and global-batch balancing this way, by how domain-specific the experts become).
    """
    p_DE = matrix_DE.double() / matrix_DE.sum().clamp(min=1)
    outer_DE = p_DE.sum(dim=1, keepdim=True) * p_DE.sum(dim=0, keepdim=True)
    nz = p_DE > 0
    return float((p_DE[nz] * torch.log2(p_DE[nz] / outer_DE[nz])).sum())
