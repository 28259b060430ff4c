"""Causality checks: do the logits of earlier tokens depend on later tokens?

A language model must not read ahead. Some routers do anyway (expert choice picks tokens for an
expert by comparing them across the sequence; soft MoE mixes the whole sequence into its slots),
and a capacity dispatch makes tokens compete for slots across the whole batch. ``future_leak``
measures it rather than trusting what a router declares: change the later tokens, and see how
far the earlier logits move.

Shape legend: B sequences, S positions.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from workbench.analysis.measure import build_model, seeded
from workbench.model import MoELM

# Largest logit change at earlier positions that still counts as "causal": a causal model gives
# exactly 0 up to float rounding (different expert group sizes can change a GEMM's blocking).
CAUSAL_TOLERANCE = 1e-4


def dropless_copy(model: MoELM) -> MoELM:
    """The same weights behind a dropless (``sorted``) dispatch, or ``model`` if nothing drops."""
    moe = model.cfg.moe
    if moe is None or moe.dispatch != "capacity":
        return model
    # capacity_scope belongs to the capacity dispatch (MoEConfig refuses "sequence" with another)
    copy, _ = build_model(model.cfg.replace(moe=replace(moe, dispatch="sorted", capacity_scope="batch")),
                          device=next(model.parameters()).device)
    copy.load_state_dict(model.state_dict())
    return copy


@torch.no_grad()
def future_leak(model: MoELM, tokens_BS: torch.Tensor, *, split: int | None = None, train_mode: bool = False,
                dropless: bool = True, seed: int = 0) -> float:
    """How much the logits at positions < ``split`` change when the tokens at positions >= ``split``
    change: the largest absolute difference, 0 (up to rounding) for a causal model.

    Every token from ``split`` on (default: half the sequence) becomes the next byte value, and
    both forwards run with the same seed, so random and noisy routers draw the same noise.
    ``dropless`` measures the router alone: the same weights behind the dropless dispatch. A
    capacity dispatch makes the tokens of the whole batch compete for slots (with position
    priority, a later token's first choice outranks an earlier token's second choice, and the
    tokens of one sequence come before those of the next), a dependence on later tokens of its
    own; ``dropless=False`` measures the model as it is configured. ``capacity_scope="sequence"``
    removes that dependence (each sequence has its own slots, claimed in token order), and this
    function is how the tests show it.
    """
    B, S = tokens_BS.shape
    split = S // 2 if split is None else split
    if not 1 <= split < S:
        raise ValueError(f"split={split!r} is invalid: must be between 1 and the sequence length - 1 = {S - 1}")
    probe = dropless_copy(model) if dropless else model
    device = next(probe.parameters()).device
    altered_BS = tokens_BS.clone()
    altered_BS[:, split:] = (altered_BS[:, split:] + 1) % probe.cfg.vocab_size
    was_training = probe.training
    probe.train(train_mode)
    try:
        logits = []
        for toks in (tokens_BS, altered_BS):
            with seeded(seed):
                logits.append(probe(toks.to(device)).logits[:, :split].float())
    finally:
        probe.train(was_training)
    return (logits[0] - logits[1]).abs().max().item()
