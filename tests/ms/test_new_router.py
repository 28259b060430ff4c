"""A new MindSpore router is one class plus one registry line, as on the PyTorch side
(tests/moe/test_new_router.py): here the cosine router, which PyTorch has and MindSpore does not,
is added to MindSpore in this file, then converted from PyTorch and checked by the parity suite."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")
from mindspore import Parameter, Tensor, ops  # noqa: E402

from workbench.moe import ROUTERS as TORCH_ROUTERS  # noqa: E402
from workbench.moe import SoftmaxGatedRouter as TorchSoftmaxGatedRouter  # noqa: E402
from workbench.moe.balance import BALANCE_LOSSES  # noqa: E402
from workbench.ms import model as msm  # noqa: E402
from workbench.ms.convert import from_torch  # noqa: E402
from workbench.ms.parity import parity_config, run_parity  # noqa: E402


def unit_rows(x_NP: Tensor) -> Tensor:
    """``torch.nn.functional.normalize(x, dim=-1)``: each row over max(its norm, 1e-12)."""
    return x_NP / ops.maximum(ops.sqrt((x_NP * x_NP).sum(axis=-1, keepdims=True)), Tensor(1e-12))


class CosineRouter(msm.SoftmaxTopKRouter):
    """``workbench.moe.routers.CosineRouter`` in MindSpore (X-MoE, Chi et al. 2022, arXiv:2204.09179):
    logits = cos(W x, w_e) / tau; the rest (softmax, top-k of probability + bias, gates) is inherited.
    ``weight`` is (cosine_dim, D): the PyTorch class's ``gate_rows``, which the base class asks."""

    def __init__(self, d_model, cfg):
        super().__init__(d_model, cfg)
        self.expert_embed = Parameter(Tensor(np.zeros((cfg.num_experts, cfg.cosine_dim), np.float32)),
                                      name="expert_embed")
        self.log_inv_temperature = Parameter(Tensor(np.zeros((), np.float32)), name="log_inv_temperature")

    def gate_logits(self, x32_TD):
        tokens_TP = unit_rows(msm.linear(x32_TD, self.weight))
        inv_tau = ops.exp(ops.minimum(self.log_inv_temperature, Tensor(math.log(100.0))))
        return inv_tau * ops.matmul(tokens_TP, unit_rows(self.expert_embed).T)


@pytest.fixture
def cosine_router(monkeypatch):
    monkeypatch.setitem(msm.ROUTERS, "cosine", CosineRouter)  # the one registry line


def small(**over):
    return parity_config("tiny", router="cosine", dispatch="sorted", **over).replace(n_layers=2, seq_len=32)


def test_the_registry_mirrors_the_pytorch_one():
    assert set(msm.ROUTERS) <= set(TORCH_ROUTERS)
    for name, cls in msm.ROUTERS.items():
        assert issubclass(cls, msm.Router), name
        # softmax-gated on both sides or on neither: the MindSpore class mirrors the PyTorch one's shape
        assert issubclass(cls, msm.SoftmaxGatedRouter) == issubclass(TORCH_ROUTERS[name], TorchSoftmaxGatedRouter)
    # the routing tuple's raw losses are the balancing losses, by name and in order
    assert msm.LayerRouting._fields[6:9] == BALANCE_LOSSES


def test_check_supported_reads_the_registry(cosine_router, monkeypatch):
    msm.check_supported(small())
    monkeypatch.delitem(msm.ROUTERS, "cosine")
    with pytest.raises(ValueError, match=r"^router='cosine' is invalid: the MindSpore model supports softmax_topk"):
        msm.check_supported(small())


@pytest.mark.parametrize(("mode", "over"), [
    ("pynative", {"bias_update_rate": 1e-3}),  # with a selection bias, which the class inherits
    ("graph", {}),
])
def test_it_converts_and_matches_pytorch(cosine_router, mode, over):
    import torch

    from workbench.model import MoELM

    cfg = small(**over)
    torch.manual_seed(0)
    mm = from_torch(MoELM(cfg))  # the PyTorch router's parameters land in the new class by name
    assert isinstance(mm.moe_routers()[0], CosineRouter)
    assert {p.name for p in mm.moe_routers()[0].get_parameters()} >= {
        "blocks.0.ffn.router.expert_embed", "blocks.0.ffn.router.log_inv_temperature"}
    report = run_parity(cfg, mode=mode, curve_steps=0, operators=mode == "pynative")
    assert report.passed, report.format()
    assert report.selection and all(s.agreement == 1.0 for s in report.selection), report.format()
