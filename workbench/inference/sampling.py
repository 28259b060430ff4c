"""Choosing the next token from the logits: greedy, temperature, top-k and top-p (nucleus) sampling.

    greedy        argmax of the logits                                     temperature = 0
    temperature   sample from softmax(logits / T)                          T > 0
    top-k         keep the k most likely tokens, renormalise               (Fan et al. 2018)
    top-p         keep the smallest set of most likely tokens whose        (Holtzman et al. 2020,
                  probability sums to at least p, renormalise               "The Curious Case of
                                                                            Neural Text Degeneration")

Top-k and top-p are applied in that order, to the temperature-scaled distribution, as Hugging
Face's and vLLM's samplers do. Draws come from a ``torch.Generator``, so a seed fixes the text.

Shape legend: B sequences, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.validation import check, is_real


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature=0`` is greedy (the other fields are then unused)."""

    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely tokens; None: all
    top_p: float | None = None  # keep the nucleus of probability mass p, in (0, 1]; None: all

    def __post_init__(self) -> None:
        check(is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
              "temperature", "must be a finite number >= 0 (0 is greedy)", self.temperature)
        if self.top_k is not None:
            check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1, "top_k",
                  "must be an integer >= 1, or None to keep every token", self.top_k)
        if self.top_p is not None:
            check(is_real(self.top_p) and 0 < self.top_p <= 1, "top_p",
                  "must be in (0, 1], or None to keep every token", self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_mask(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) bool: True for the k largest logits of each row (ties at the k-th value all kept)."""
    kth_B1 = logits_BV.topk(min(k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
    return logits_BV >= kth_B1


def top_p_mask(probs_BV: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) bool: the nucleus of each row, the fewest most likely tokens whose probabilities sum
    to at least ``p``. A token is in it when the mass of the tokens ranked before it is below p,
    so the most likely token always is."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    keep_sorted_BV = mass_before_BV < p
    return torch.zeros_like(keep_sorted_BV).scatter_(-1, order_BV, keep_sorted_BV)


def next_token_distribution(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) fp32 probabilities that ``sample`` draws from (temperature, then top-k, then top-p)."""
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k is not None:
        logits_BV = logits_BV.masked_fill(~top_k_mask(logits_BV, cfg.top_k), float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    if cfg.top_p is not None and cfg.top_p < 1:
        probs_BV = probs_BV * top_p_mask(probs_BV, cfg.top_p)
        probs_BV = probs_BV / probs_BV.sum(dim=-1, keepdim=True)
    return probs_BV


def sample(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) long: the next token of each sequence."""
    if cfg.greedy:
        return logits_BV.argmax(dim=-1)
    probs_BV = next_token_distribution(logits_BV, cfg)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
