"""Causality is measured, not declared: later tokens must not move earlier logits."""

from __future__ import annotations

import pytest
import torch

from workbench.analysis import CAUSAL_TOLERANCE, build_model, dropless_copy, future_leak, router_config


def _model(router, micro, **kw):
    cfg, _ = router_config(router, num_experts=4, top_k=2, base=micro, **kw)
    return build_model(cfg, seed=0)[0]


def test_future_leak_separates_causal_and_non_causal_routers(tokens, micro):
    assert future_leak(_model("softmax_topk", micro), tokens, train_mode=True) <= CAUSAL_TOLERANCE
    assert future_leak(_model("softmax_topk", micro), tokens, train_mode=False) <= CAUSAL_TOLERANCE
    assert future_leak(_model("expert_choice", micro), tokens, train_mode=True) > CAUSAL_TOLERANCE
    assert future_leak(_model("soft_moe", micro), tokens, train_mode=False) > CAUSAL_TOLERANCE
    with pytest.raises(ValueError, match="split"):
        future_leak(_model("softmax_topk", micro), tokens, split=tokens.shape[1])


def test_future_leak_is_the_largest_logit_change_before_the_split(tokens, micro):
    model = _model("soft_moe", micro, capacity_factor=None)  # not causal: the change is large
    model.eval()
    altered = tokens.clone()
    altered[:, 10:] = (altered[:, 10:] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        direct = (model(tokens).logits[:, :10] - model(altered).logits[:, :10]).abs().max().item()
    assert direct > 1e-3
    assert future_leak(model, tokens, split=10) == pytest.approx(direct, rel=1e-6)


def test_dropless_copy_has_the_same_weights_behind_the_sorted_dispatch(micro):
    model = _model("softmax_topk", micro)
    assert model.cfg.moe.dispatch == "capacity"
    copy = dropless_copy(model)
    assert copy is not model and copy.cfg.moe.dispatch == "sorted"
    for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    dropless = _model("softmax_topk", micro, capacity_factor=None)
    assert dropless_copy(dropless) is dropless
