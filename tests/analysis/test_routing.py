"""Routing traces of a single text and the domain x expert lift."""

from __future__ import annotations

import torch

from workbench.analysis import domain_specialization, route_text
from workbench.data import ByteTokenizer
from workbench.model import MoELM


def test_domain_specialization_is_the_lift_over_the_average_token():
    counts_DE = torch.tensor([[30, 10, 0], [10, 30, 20]])
    lift = domain_specialization(counts_DE)
    # P(e | d) / P(e): P(e) = (40, 40, 20) / 100
    expected = torch.tensor([[0.75 / 0.4, 0.25 / 0.4, 0.0], [(1 / 6) / 0.4, 0.5 / 0.4, (1 / 3) / 0.2]],
                            dtype=torch.float64)
    torch.testing.assert_close(lift, expected)
    # a domain that uses experts exactly as the average token does has lift 1 everywhere
    uniform_lift = domain_specialization(torch.tensor([[2, 6], [1, 3]]))
    torch.testing.assert_close(uniform_lift, torch.ones(2, 2, dtype=torch.float64))


def test_route_text_routes_every_byte_in_evaluation_mode_and_restores_the_mode(micro):
    model = MoELM(micro)
    model.train()
    text = "héllo wörld " * 5  # 70 bytes: longer than seq_len=32, and multi-byte characters
    trace = route_text(model, text)
    ids = ByteTokenizer().encode(text)[: micro.seq_len]
    assert trace.token_strings == ByteTokenizer().token_strings(ids) and len(trace.token_strings) == micro.seq_len
    assert trace.layers == micro.moe_layers
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).routing
    for layer, info in zip(trace.layers, expected, strict=True):
        assert torch.equal(trace.layer(layer).router_output.expert_ids_TK, info.router_output.expert_ids_TK)
