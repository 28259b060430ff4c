"""Measuring routers: one fixed batch through one model, every MoE layer's routing and metrics.

For any name in ``workbench.moe.ROUTERS``:

- ``router_config`` makes the model config: the ``capacity`` dispatch with a stated capacity
  factor (so an overflowing expert drops assignments and the layer counts them exactly), plus the
  adjustments a router needs (``switch`` routes to one expert), recorded as notes;
- ``build_model`` initialises the model as ``Trainer`` does, with a fixed seed;
- ``route_batch`` routes one batch through a model and keeps every MoE layer's ``RoutingInfo``
  and ``routing_metrics``; ``analyze_router`` does both for a fresh model;
- ``fixed_batch`` takes the same validation windows for every router.

Routing is measured in training mode by default, the routing the balancing losses and the
dispatch see during training (Sinkhorn balances over the batch, noisy top-k adds its noise),
under ``torch.no_grad`` and with torch's global generator forked and seeded: a measurement is
reproducible and leaves a training run that follows it unchanged.

Routers that warn with ``CausalLeakWarning`` when built (expert choice, soft MoE) are built
with the warning caught; its text becomes one of the result's ``notes``.

Shape legend: B sequences, S positions, T = B*S tokens, E experts, K experts per token.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from workbench.config import ModelConfig, tiny
from workbench.data import Batch, LMData
from workbench.model import MoELM
from workbench.moe import ROUTERS, CausalLeakWarning, RoutingInfo, routing_metrics
from workbench.validation import check_choice

DEFAULT_CAPACITY_FACTOR = 1.25

BALANCE_KEYS = ("max_vio", "cv", "entropy", "unused_experts", "dropped_fraction")


# --- configuration and model ---------------------------------------------------------------


def router_config(router: str, *, num_experts: int = 8, top_k: int = 2,
                  capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR, base: ModelConfig | None = None,
                  **moe_overrides: Any) -> tuple[ModelConfig, list[str]]:
    """The model config for ``router`` with ``num_experts`` and ``top_k``, and notes on what changed.

    ``base`` (default: the ``tiny`` preset) gives every other field. ``capacity_factor`` selects
    the ``capacity`` dispatch, C = ceil(capacity_factor * T * K / E) slots per expert; ``None``
    keeps ``base``'s dispatch. A router with a fixed top-k (its class's ``fixed_top_k``; ``switch``:
    1) gets it, and a ``top_k`` above ``num_experts`` is lowered to ``num_experts``; each adjustment
    adds a note. An unknown router raises ``ValueError`` listing the known ones.
    """
    check_choice("router", router, ROUTERS)
    base = base if base is not None else tiny()
    if base.moe is None:
        raise ValueError("base is a dense model (moe=None): give a config with an MoE layer")
    notes: list[str] = []
    fixed = ROUTERS[router].fixed_top_k
    if fixed is not None and top_k != fixed:
        notes.append(f"{router} routes every token to {fixed} expert{'s' if fixed > 1 else ''}: top_k={fixed} "
                     f"(asked for {top_k})")
        top_k = fixed
    if top_k > num_experts:
        notes.append(f"top_k={top_k} is more than num_experts={num_experts}: top_k={num_experts}")
        top_k = num_experts
    changes: dict[str, Any] = {"router": router, "num_experts": num_experts, "top_k": top_k, **moe_overrides}
    if capacity_factor is not None:
        changes.update(dispatch="capacity", capacity_factor=capacity_factor)
    if ROUTERS[router].mixes_tokens:
        notes.append(f"{router} mixes tokens into slots: every expert processes the same number of slots and "
                     "nothing is dropped; load and gates describe each token's top_k experts by combine mass")
    return base.replace(moe=replace(base.moe, **changes)), notes


@contextlib.contextmanager
def seeded(seed: int):
    """Fork torch's generators (CPU and the current CUDA device, if any) and seed them: what runs
    inside draws the same numbers every time, and the caller's generator is left as it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def catch_causal_warnings(notes: list[str]):
    """Turn ``CausalLeakWarning``s into notes (each text once); other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, CausalLeakWarning):
            text = str(w.message)
            if text not in notes:
                notes.append(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> tuple[MoELM, list[str]]:
    """``MoELM(cfg)`` initialised as ``Trainer`` does (``torch.manual_seed(seed)`` first), with
    the global generator left as it was, and the causality warnings as notes."""
    notes: list[str] = []
    with seeded(seed), catch_causal_warnings(notes):
        model = MoELM(cfg).to(device)
    return model, notes


# --- one batch through one model ---------------------------------------------------------


@dataclass
class BatchRouting:
    """How every MoE layer of one model routed one fixed batch (tokens ``(B, S)``)."""

    router: str
    num_experts: int
    top_k: int  # as configured (switch: 1; expert choice: its capacity factor c = top_k)
    layers: list[int]  # model layer index of each MoE layer
    routing: list[RoutingInfo]  # one per MoE layer, T = B * S tokens
    metrics: list[dict[str, Any]]  # routing_metrics per MoE layer, plus mean_gate and capacity
    tokens: torch.Tensor  # (B, S) the batch, on the CPU
    train_mode: bool
    notes: list[str] = field(default_factory=list)

    def layer_info(self, layer: int) -> RoutingInfo:
        return self.routing[self._index(layer)]

    def layer_metrics(self, layer: int) -> dict[str, Any]:
        return self.metrics[self._index(layer)]

    def _index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer={layer!r} is invalid: the MoE layers are {self.layers}")
        return self.layers.index(layer)

    def gates(self, layer: int) -> torch.Tensor:
        """(real assignments,) fp32: the combine weight of every real token-expert assignment."""
        return real_gates(self.layer_info(layer))

    def balance(self) -> dict[str, float]:
        """The batch's balance, averaged over the MoE layers (``unused_experts``: summed).

        Keys: ``BALANCE_KEYS`` plus ``router_confidence``, ``mean_gate``, ``experts_per_token``.
        """
        out: dict[str, float] = {}
        for key in (*BALANCE_KEYS, "router_confidence", "mean_gate", "experts_per_token"):
            values = [m[key] for m in self.metrics]
            out[key] = float(sum(values)) if key == "unused_experts" else sum(values) / len(values)
        return out


def real_gates(info: RoutingInfo) -> torch.Tensor:
    """The combine weights of the real assignments of one layer, flattened (padding left out), CPU fp32."""
    weights_TK = info.router_output.weights_TK.detach()
    if info.router_output.mask_TK is not None:
        weights_TK = weights_TK[info.router_output.mask_TK]
    return weights_TK.flatten().float().cpu()


@torch.no_grad()
def route_batch(model: MoELM, tokens_BS: torch.Tensor, *, seed: int = 0, train_mode: bool = True,
                notes: Iterable[str] = ()) -> BatchRouting:
    """Run ``tokens_BS`` through ``model`` and keep every MoE layer's routing and metrics.

    ``train_mode`` routes as in training (noise, Sinkhorn balancing, jitter) without changing
    anything but the generator, which is forked and seeded with ``seed``; the model's mode is
    restored. Metrics: ``routing_metrics`` per layer, plus ``mean_gate`` (mean combine weight of
    the real assignments) and ``capacity`` (slots per expert; None for a dropless dispatch).
    """
    moe = model.cfg.moe
    if moe is None:
        raise ValueError("the model is dense (moe=None): there is no routing to analyse")
    device = next(model.parameters()).device
    was_training = model.training
    model.train(train_mode)
    try:
        with seeded(seed):
            out = model(tokens_BS.to(device))
    finally:
        model.train(was_training)
    metrics = []
    for info in out.routing:
        m = routing_metrics(info)
        gates = real_gates(info)
        m["mean_gate"] = gates.mean().item() if gates.numel() else float("nan")
        m["capacity"] = info.stats.capacity
        metrics.append(m)
    return BatchRouting(moe.router, moe.num_experts, moe.top_k, list(model.cfg.moe_layers), out.routing, metrics,
                        tokens_BS.detach().cpu(), train_mode, list(notes))


def analyze_router(router: str, tokens_BS: torch.Tensor, *, num_experts: int = 8, top_k: int = 2,
                   capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR, seed: int = 0,
                   base: ModelConfig | None = None, train_mode: bool = True, device: str | torch.device = "cpu",
                   **moe_overrides: Any) -> BatchRouting:
    """Route one fixed batch through a freshly initialised model with ``router``.

    The model is the one ``Trainer`` would start from with the same config and ``seed``
    (``router_config``, then ``build_model``); the result's ``notes`` hold the config
    adjustments and the caught causality warnings.
    """
    cfg, notes = router_config(router, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                               base=base, **moe_overrides)
    model, build_notes = build_model(cfg, seed=seed, device=device)
    return route_batch(model, tokens_BS, seed=seed, train_mode=train_mode, notes=notes + build_notes)


def fixed_batch(data: LMData, sequences_per_domain: int = 2) -> Batch:
    """The first ``sequences_per_domain`` validation windows of every domain, as one batch.

    Validation windows are fixed (they do not depend on a step or a seed) and lie inside one
    domain each, so every router is measured on the same tokens, with every domain present.
    """
    if sequences_per_domain < 1:
        raise ValueError(f"sequences_per_domain={sequences_per_domain!r} is invalid: must be >= 1")
    firsts = [batches[0] for batches in data.val_batches(batch_size=sequences_per_domain).values()]
    if not firsts:
        raise ValueError("the data has no validation windows: raise val_windows_per_domain or val_fraction")
    return Batch(*(torch.cat(parts) for parts in zip(*((b.tokens, b.targets, b.domains, b.starts) for b in firsts),
                                                     strict=True)))
