"""Acceptance: every router (and the dense baseline) trains end to end in the tiny model.

Ten AdamW steps on one fixed batch of random bytes: the loss stays finite, every router
parameter gets a finite gradient, and the loss goes down (the batch is memorised).
About 0.3 s per router on 2 CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import ModelConfig, MoEConfig, dense_baseline, tiny
from workbench.model import MoELM
from workbench.moe import ROUTERS, routing_metrics

pytestmark = pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")

STEPS, BATCH, SEQ = 10, 4, 32


def config(name: str) -> ModelConfig:
    if name == "dense":
        return dense_baseline(tiny())
    if name == "switch":  # the tiny preset fixes top_k=2, and Switch routes to one expert
        return tiny().replace(moe=MoEConfig(**{**tiny().moe.__dict__, "router": "switch", "top_k": 1}))
    return tiny(router=name)


@pytest.mark.parametrize("name", [*ROUTERS, "dense"])
def test_every_router_trains_end_to_end_in_the_tiny_model(name):
    torch.manual_seed(0)
    cfg = config(name)
    model = MoELM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(STEPS):
        out = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if ".router." in n:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        model.finish_optimizer_step()
        losses.append(out.loss.item())
        assert math.isfinite(losses[-1]), f"step {step}: loss {losses[-1]}"
        for info in out.routing:
            assert torch.isfinite(info.weighted_loss)
    assert losses[0] == pytest.approx(math.log(256), abs=0.15)
    assert losses[-1] < losses[0] - 0.5, losses
    for info in out.routing:  # the metrics read every router's output
        m = routing_metrics(info)
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
