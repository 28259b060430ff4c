"""MoELM.forward refuses bad inputs with a ValueError naming the argument, before any torch internals."""

from __future__ import annotations

import pytest
import torch

from workbench.config import ModelConfig, MoEConfig
from workbench.model import MoELM


def micro(router: str = "softmax_topk") -> MoELM:
    return MoELM(ModelConfig(seq_len=16, d_model=32, n_layers=1, n_heads=2, dense_hidden=64,
                             moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router=router)))


@pytest.mark.filterwarnings("ignore:router='expert_choice' is not causal")
@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice", "sinkhorn"])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0)])
def test_an_empty_batch_is_refused_naming_tokens(router, shape):
    model = micro(router)
    with pytest.raises(ValueError, match=rf"tokens has shape \({shape[0]}, {shape[1]}\): an empty batch"):
        model(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("tokens, needle", [
    (torch.zeros(2, 8), r"tokens must hold integer token ids \(torch.long\), got dtype torch.float32"),
    (torch.zeros(8, dtype=torch.long), r"tokens must be 2-D \(B, S\), got shape \(8,\); add a batch dimension"),
    (torch.full((2, 8), 256), r"tokens holds ids outside \[0, vocab_size=256\): min 256, max 256"),
    (torch.full((2, 8), -1), r"tokens holds ids outside \[0, vocab_size=256\): min -1, max -1"),
    (torch.zeros(2, 17, dtype=torch.long), r"tokens has sequence length 17, more than ModelConfig.seq_len=16"),
    ([[1, 2, 3]], r"tokens must be a \(B, S\) tensor of token ids, got list"),
])
def test_bad_tokens_are_refused_naming_tokens(tokens, needle):
    with pytest.raises(ValueError, match=needle):
        micro()(tokens)


def test_bad_targets_and_padding_mask_are_named():
    model, tokens = micro(), torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets must have the shape of tokens \(2, 8\), got \(2, 7\)"):
        model(tokens, torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets holds ids outside \[0, vocab_size=256\).*max 300"):
        model(tokens, torch.full((2, 8), 300))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor of the shape of tokens"):
        model(tokens, padding_mask=torch.ones(2, 8))


def test_valid_edges_still_run():
    model = micro()
    tokens = torch.tensor([[0, 255] * 8])  # the smallest and largest ids, a full-length sequence
    targets = tokens.clone()
    targets[0, :3] = -100  # ignored positions are allowed
    out = model(tokens, targets)
    assert torch.isfinite(out.loss)
    assert model(tokens.int()).logits.shape == (1, 16, 256)  # int32 ids too
