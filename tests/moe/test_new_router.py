"""A new router is one class plus one registry line: it validates, trains and is counted exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from workbench.config import ModelConfig, MoEConfig, dense_baseline
from workbench.kernels import cpu as cpu_kernels
from workbench.model import MoELM
from workbench.moe import ROUTERS, SoftmaxGatedRouter


class MLPRouter(SoftmaxGatedRouter):
    """A router of our own: logits from a two-layer ReLU network, x -> 2E -> E; top-k of the softmax.

    Everything the workbench needs to know about it is stated here."""

    has_selection_bias = True  # it selects by probability + bias, so loss-free balancing applies

    @classmethod
    def gate_rows(cls, cfg):
        return 2 * cfg.num_experts  # the first layer is the router's input projection

    @classmethod
    def num_params(cls, d_model, cfg):
        return d_model * 2 * cfg.num_experts + 2 * cfg.num_experts * cfg.num_experts

    def __init__(self, d_model, cfg):
        super().__init__(d_model, cfg)
        self.out = nn.Parameter(torch.randn(cfg.num_experts, 2 * cfg.num_experts) * 0.1)

    def gate_logits(self, x32_TD):
        return F.linear(F.relu(F.linear(x32_TD, self.weight.float())), self.out.float())

    def select(self, logits_TE, probs_TE, token_ids_T):
        return self.biased(probs_TE).topk(self.top_k, dim=-1, sorted=False).indices


@pytest.fixture
def mlp_router(monkeypatch):
    monkeypatch.setitem(ROUTERS, "mlp", MLPRouter)  # the one registry line


def config(**moe) -> ModelConfig:
    return ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                       moe=MoEConfig(router="mlp", num_experts=4, top_k=2, expert_hidden=24, **moe))


def test_the_registry_and_the_config_know_it(mlp_router):
    assert "mlp" in str(pytest.raises(ValueError, MoEConfig, router="nope").value)
    MoEConfig(router="mlp", bias_update_rate=1e-3)  # it has a selection bias


def test_parameters_are_counted_exactly(mlp_router):
    cfg = config()
    model = MoELM(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    router_params = 32 * 8 + 8 * 4
    assert cfg.moe.router_params(32) == router_params
    inactive = len(cfg.moe_layers) * (4 - 2) * 3 * 32 * 24
    assert cfg.num_active_params() == cfg.num_params() - inactive


def test_flops_per_token_match_a_flop_counter(mlp_router):
    cfg = config(dispatch="loop")
    with cpu_kernels.fused_cpu_kernel(False):  # the readable model: the fused kernels are opaque to the counter
        model = MoELM(cfg)
    tokens = torch.randint(0, 256, (2, cfg.seq_len))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).loss.backward()
    counted = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in counted.items() if "scaled_dot_product" not in str(k)) / tokens.numel()
    attention = 6 * 2 * cfg.n_layers * cfg.seq_len * cfg.d_model
    assert matmul + attention == cfg.flops_per_token()
    # and its dense baseline differs by exactly its matmul weights
    assert cfg.flops_per_token() - dense_baseline(cfg).flops_per_token() == 6 * 2 * (32 * 8 + 8 * 4)


def test_it_trains_with_loss_free_balancing(mlp_router):
    torch.manual_seed(0)
    cfg = config(bias_update_rate=1e-2)
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 16, (8, cfg.seq_len))  # a small alphabet: learnable in a few steps
    losses = []
    for _ in range(30):
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.finish_optimizer_step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert model.moe_layers()[0].router.out.grad.abs().sum() > 0
    assert model.moe_layers()[0].router.bias.abs().sum() > 0  # the bias moved
