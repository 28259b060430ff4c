"""The MindSpore model against the PyTorch reference, through the parity suite (workbench.ms.parity):
fp32 on CPU, forward within 1e-5 and gradients within 1e-4 relative, the same experts selected."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")

from workbench.ms import model as msm  # noqa: E402
from workbench.ms.parity import TOLERANCES, parity_config, run_parity, selection_agreement  # noqa: E402


def small(router, dispatch, **over):
    return parity_config("tiny", router=router, dispatch=dispatch, **over).replace(n_layers=2, seq_len=32)


@pytest.mark.parametrize(("router", "dispatch", "over"), [
    ("softmax_topk", "sorted", {}),
    # DeepSeek-V3 routing: groups, route scale, a selection bias; gated shared expert; capacity with drops
    ("sigmoid", "capacity", {"bias_update_rate": 1e-3, "num_shared_experts": 1, "shared_expert_gate": True,
                             "capacity_factor": 1.0}),
])
def test_every_operator_and_end_to_end(router, dispatch, over):
    report = run_parity(small(router, dispatch, **over), curve_steps=0)
    failed = [c for c in report.checks if not c.passed]
    assert not failed, report.format()
    assert report.selection and all(s.agreement == 1.0 for s in report.selection), report.format()
    names = {c.operator for c in report.checks}
    assert {"embedding", "RMSNorm", "RoPE", "attention", "router", "expert FFN", f"dispatch+combine ({dispatch})",
            "Switch aux loss", "sequence-wise loss", "router z-loss", "loss-free bias update", "end to end",
            "AdamW, same gradients"} <= names
    e2e = {c.quantity: c for c in report.checks if c.operator == "end to end"}
    assert e2e["logits"].max_rel <= 1e-5 and e2e["loss"].max_rel <= 1e-5
    grads = next(c for q, c in e2e.items() if q.startswith("grad"))
    assert grads.max_rel <= 1e-4


def test_capacity_dispatch_really_drops_and_agrees():
    """The capacity check above is only meaningful if assignments were dropped: make sure they were."""
    report = run_parity(small("softmax_topk", "capacity", capacity_factor=0.5), curve_steps=0, operators=True,
                        end_to_end=False)
    kept = next(c for c in report.checks if c.quantity == "kept per expert")
    routed = next(c for c in report.checks if c.quantity == "tokens per expert")
    assert kept.passed and routed.passed
    import torch

    from workbench.model import MoELM

    torch.manual_seed(0)
    cfg = small("softmax_topk", "capacity", capacity_factor=0.5)
    _, info = MoELM(cfg).blocks[0].ffn(torch.randn(2, 32, cfg.d_model))
    assert int(info.stats.dropped_assignments) > 0


@pytest.mark.parametrize(("router", "dispatch", "over"), [
    ("switch", "capacity", {}),
    ("uniform", "sorted", {}),
    ("softmax_topk", "sorted", {"num_shared_experts": 1, "normalize_topk": False, "route_scale": 2.0}),
])
def test_end_to_end_other_routers(router, dispatch, over):
    cfg = small(router, dispatch, **over).replace(tie_embeddings=router == "uniform")
    report = run_parity(cfg, curve_steps=0, operators=False)
    assert report.passed, report.format()


def test_parity_fails_when_a_weight_differs(monkeypatch):
    """The suite can fail: a MindSpore model with one attention weight matrix off by 1e-4 is caught."""
    from workbench.ms import convert

    real = convert.from_torch

    def off(torch_model, block_rows=64):
        model = real(torch_model, block_rows)
        w = model.blocks[1].attn.out
        w.set_data(msm.Tensor(w.asnumpy() + 1e-4))
        return model

    monkeypatch.setattr("workbench.ms.parity.from_torch", off)
    report = run_parity(small("softmax_topk", "sorted"), curve_steps=0, operators=False)
    assert not report.passed
    assert any(c.quantity == "logits" and not c.passed for c in report.checks)


def test_near_ties_are_classified_by_the_reference_gap():
    ranked = np.array([[0.5, 0.3, 0.2, 0.0], [0.4, 0.3, 0.3 - 1e-7, 0.0]], np.float32)
    ids_torch = np.array([[0, 1], [0, 1]])
    ids_ms = np.array([[1, 0], [0, 2]])  # token 0: the same set in another order; token 1: swapped at a tie
    s = selection_agreement(0, ids_ms, ids_torch, ranked)
    assert (s.agree, s.near_ties, s.passed) == (1, 1, True)
    s = selection_agreement(0, np.array([[0, 2], [0, 1]]), ids_torch, ranked)  # token 0 swapped at a 0.1 gap
    assert (s.agree, s.near_ties, s.passed) == (1, 0, False)


def test_tolerances_are_the_issue_s():
    assert TOLERANCES["forward"] == 1e-5 and TOLERANCES["gradient"] == 1e-4
