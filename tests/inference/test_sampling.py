"""Sampling: greedy, top-k, top-p (the nucleus, exactly), temperature, and reproducibility by seed."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import ModelConfig, MoEConfig
from workbench.inference import SamplingConfig, generate, sample, stream_generate
from workbench.inference.sampling import next_token_distribution, top_k_mask, top_p_mask
from workbench.model import MoELM


def tiny_model(seed: int = 0) -> MoELM:
    cfg = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=4, dense_hidden=32,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    torch.manual_seed(seed)
    return MoELM(cfg).eval()


def brute_force_nucleus(probs: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches p, by trying sizes in order."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    for size in range(1, len(probs) + 1):
        if sum(probs[i] for i in order[:size]) >= p - 1e-12:
            return set(order[:size])
    return set(order)


@pytest.mark.parametrize("p", [0.5, 0.79, 0.8, 0.81, 0.95, 0.951, 1.0])
def test_top_p_keeps_exactly_the_nucleus(p):
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 0.5, 0.3, 0.15, 0.05; cumulative 0.5, 0.8, 0.95, 1.0
    kept = set(torch.nonzero(top_p_mask(torch.tensor([probs], dtype=torch.float64), p)[0]).flatten().tolist())
    assert kept == brute_force_nucleus(probs, p)


def test_top_p_on_random_distributions_matches_the_brute_force_nucleus():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        probs = torch.rand(12, generator=g, dtype=torch.float64).softmax(0)
        p = float(torch.rand(1, generator=g))
        kept = set(torch.nonzero(top_p_mask(probs[None], p)[0]).flatten().tolist())
        assert kept == brute_force_nucleus(probs.tolist(), p)


def test_sampling_never_leaves_the_nucleus_and_renormalises_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_p=0.8)
    dist = next_token_distribution(logits, cfg)[0]
    torch.testing.assert_close(dist, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
    draws = sample(logits.expand(4000, 4), cfg, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.625) < 4 * math.sqrt(0.625 * 0.375 / 4000)  # four standard errors


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True, False]]
    draws = sample(logits.expand(500, 5), SamplingConfig(temperature=2.0, top_k=2), torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1, 3}


def test_temperature_scales_the_logits_and_zero_is_greedy():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    torch.testing.assert_close(next_token_distribution(logits, SamplingConfig(temperature=0.5))[0],
                               (logits[0] / 0.5).softmax(0))
    assert sample(logits, SamplingConfig()).tolist() == [2]


def test_the_same_seed_gives_the_same_text_and_another_seed_another():
    model = tiny_model()
    kwargs = {"temperature": 1.0, "top_p": 0.95}
    first = generate(model, ["hello", "12 +"], 24, seed=7, **kwargs)
    again = generate(model, ["hello", "12 +"], 24, seed=7, **kwargs)
    other = generate(model, ["hello", "12 +"], 24, seed=8, **kwargs)
    assert first.new_tokens == again.new_tokens
    assert first.new_tokens != other.new_tokens


def test_the_stream_yields_the_tokens_that_generate_returns():
    model = tiny_model()
    steps = stream_generate(model, ["hello", "ab"], 10, temperature=1.0, seed=3)
    streamed = []
    while True:
        try:
            streamed.append(next(steps).tokens)
        except StopIteration as done:
            result = done.value
            break
    assert [list(col) for col in zip(*streamed, strict=True)] == result.new_tokens
    assert result.new_tokens == generate(model, ["hello", "ab"], 10, temperature=1.0, seed=3).new_tokens


def test_a_stop_byte_ends_its_sequence_and_is_left_out_of_the_text():
    model = tiny_model()
    free = generate(model, ["hello", "xy"], 12)
    stop = free.new_tokens[0][3]  # the fourth byte the first sequence generates greedily
    result = generate(model, ["hello", "xy"], 12, stop=stop)
    first = free.new_tokens[0]
    assert result.new_tokens[0] == first[:first.index(stop) + 1]
    assert result.stopped[0]
    assert result.texts[0] == bytes(first[:first.index(stop)]).decode("utf-8", errors="replace")
    if stop in free.new_tokens[1]:
        assert result.new_tokens[1] == free.new_tokens[1][:free.new_tokens[1].index(stop) + 1]
    else:
        assert result.new_tokens[1] == free.new_tokens[1] and not result.stopped[1]
