"""Routers side by side: one fixed batch, a short training run, balance and dropping compared.

The functions behind ``notebooks/01_routers.ipynb``. For any name in ``workbench.moe.ROUTERS``:

- ``router_config`` makes the model config: the ``capacity`` dispatch with a stated capacity
  factor (so an overflowing expert drops assignments and the layer counts them exactly), plus the
  adjustments a router needs (``switch`` routes to one expert), recorded as notes;
- ``analyze_router`` builds a fresh model with a fixed seed and routes one fixed batch through
  it (``route_batch``): every MoE layer's ``RoutingInfo`` and ``routing_metrics``;
- ``train_router`` measures the same batch on the ``Trainer``'s model before and after a short
  run, and keeps the validation loss, the throughput and a causality measurement;
- ``future_leak`` measures whether the logits of earlier tokens depend on later tokens;
- ``summary_rows`` and ``router_takeaways`` turn runs into table rows and sentences computed
  from them, so a notebook states nothing its run did not compute.

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
import math
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from workbench.config import ModelConfig, tiny
from workbench.data import Batch, ByteTokenizer, LMData
from workbench.model import MoELM
from workbench.moe import ROUTERS, CausalLeakWarning, RoutingInfo, routing_metrics

DEFAULT_CAPACITY_FACTOR = 1.25
# Largest logit change at earlier positions that still counts as "causal": a causal model gives
# exactly 0 up to float rounding (different expert group sizes can change a GEMM's blocking).
CAUSAL_TOLERANCE = 1e-4

BALANCE_KEYS = ("max_vio", "cv", "entropy", "unused_experts", "dropped_fraction")


# --- configuration ------------------------------------------------------------------------


def router_config(router: str, *, num_experts: int = 8, top_k: int = 2,
                  capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR, base: ModelConfig | None = None,
                  **moe_overrides: Any) -> tuple[ModelConfig, list[str]]:
    """The model config for ``router`` with ``num_experts`` and ``top_k``, and notes on what changed.

    ``base`` (default: the ``tiny`` preset) gives every other field. ``capacity_factor`` selects
    the ``capacity`` dispatch, C = ceil(capacity_factor * T * K / E) slots per expert; ``None``
    keeps ``base``'s dispatch. ``switch`` gets ``top_k=1``; a ``top_k`` above ``num_experts`` is
    lowered to ``num_experts``; each adjustment adds a note. An unknown router raises ``ValueError``
    listing the known ones.
    """
    if router not in ROUTERS:
        raise ValueError(f"router={router!r} is invalid: allowed values are {', '.join(ROUTERS)}")
    base = base if base is not None else tiny()
    if base.moe is None:
        raise ValueError("base is a dense model (moe=None): give a config with an MoE layer")
    notes: list[str] = []
    if router == "switch" and top_k != 1:
        notes.append(f"switch routes every token to one expert: top_k=1 (asked for {top_k})")
        top_k = 1
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
def _seeded(seed: int):
    """Fork torch's generators (CPU and the current CUDA device, if any) and seed them."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _catch_causal_warnings(notes: list[str]):
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
    with _seeded(seed), _catch_causal_warnings(notes):
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

    def panel_data(self, layer: int, sequence: int = 0, length: int | None = 48) -> dict[str, Any]:
        """Keyword arguments for ``workbench.viz.plot_router_panel``: the first ``length`` tokens of
        ``sequence`` (token x expert weights) and the whole batch's load, gate mass and gates."""
        info, m = self.layer_info(layer), self.layer_metrics(layer)
        B, S = self.tokens.shape
        if not 0 <= sequence < B:
            raise ValueError(f"sequence={sequence!r} is invalid: the batch has {B} sequences")
        n = S if length is None else min(length, S)
        rows = slice(sequence * S, sequence * S + n)
        weights_TK = info.router_output.weights_TK
        if info.router_output.mask_TK is not None:
            weights_TK = weights_TK * info.router_output.mask_TK
        return {
            "token_strings": ByteTokenizer().token_strings(self.tokens[sequence, :n]),
            "expert_ids_TK": info.router_output.expert_ids_TK[rows].cpu(),
            "weights_TK": weights_TK[rows].float().cpu(),
            "num_experts": self.num_experts,
            "tokens_per_expert": m["tokens_per_expert"],
            "gate_mass": m["gate_mass"],
            "gates": self.gates(layer),
            "capacity": m["capacity"],
            "dropped_fraction": m["dropped_fraction"],
            "max_vio": m["max_vio"],
        }


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
        with _seeded(seed):
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


# --- causality ----------------------------------------------------------------------------


def _dropless_copy(model: MoELM) -> MoELM:
    """The same weights behind a dropless (``sorted``) dispatch, or ``model`` if nothing drops."""
    moe = model.cfg.moe
    if moe is None or moe.dispatch != "capacity":
        return model
    copy, _ = build_model(model.cfg.replace(moe=replace(moe, dispatch="sorted")),
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
    own; ``dropless=False`` measures the model as it is configured.
    """
    B, S = tokens_BS.shape
    split = S // 2 if split is None else split
    if not 1 <= split < S:
        raise ValueError(f"split={split!r} is invalid: must be between 1 and the sequence length - 1 = {S - 1}")
    probe = _dropless_copy(model) if dropless else model
    device = next(probe.parameters()).device
    altered_BS = tokens_BS.clone()
    altered_BS[:, split:] = (altered_BS[:, split:] + 1) % probe.cfg.vocab_size
    was_training = probe.training
    probe.train(train_mode)
    try:
        logits = []
        for toks in (tokens_BS, altered_BS):
            with _seeded(seed):
                logits.append(probe(toks.to(device)).logits[:, :split].float())
    finally:
        probe.train(was_training)
    return (logits[0] - logits[1]).abs().max().item()


# --- a short training run ------------------------------------------------------------------


@dataclass
class RouterRun:
    """One router: the fixed batch before and after a short run, and what the run measured."""

    router: str
    init: BatchRouting
    trained: BatchRouting
    steps: int
    val_loss: float  # final validation loss (nats / byte), evaluated as the model evaluates
    tokens_per_s: float  # median training throughput
    history: list[dict[str, Any]]  # the trainer's rows
    leak: dict[str, float]  # future_leak of the trained model: "train", "eval" (dropless), "eval_capacity"
    notes: list[str] = field(default_factory=list)

    def causal(self, mode: str, tolerance: float = CAUSAL_TOLERANCE) -> bool:
        """Whether earlier logits ignored later tokens in ``mode`` ("train", "eval", "eval_capacity")."""
        return self.leak[mode] <= tolerance


def train_router(router: str, data: LMData, tokens_BS: torch.Tensor, *, steps: int, num_experts: int = 8,
                 top_k: int = 2, capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR, seed: int = 0,
                 base: ModelConfig | None = None, train_overrides: Mapping[str, Any] | None = None,
                 callback: Callable[..., None] | None = None, **moe_overrides: Any) -> RouterRun:
    """Train ``router`` for ``steps`` with ``Trainer`` and measure ``tokens_BS`` before and after.

    The run goes to a temporary directory that is removed afterwards (``progress=False``,
    evaluation and checkpoint at the last step only). ``train_overrides`` sets other
    ``TrainConfig`` fields (lr, warmup_steps, device...); ``data`` gives the batches (its
    ``batch_size`` is the run's). The measurement before training uses the model exactly as
    ``Trainer`` initialised it and does not change the run (the generator is forked).
    """
    from workbench.train import TrainConfig, Trainer

    cfg, notes = router_config(router, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                               base=base, **moe_overrides)
    with tempfile.TemporaryDirectory(prefix=f"routers-{router}-") as run_dir:
        settings = {"steps": steps, "seed": seed, "batch_size": data.batch_size, "eval_every": steps,
                    "checkpoint_every": steps, "keep_checkpoints": 1, "run_dir": run_dir, "progress": False,
                    **(train_overrides or {})}
        with _catch_causal_warnings(notes):
            trainer = Trainer(cfg, TrainConfig(**settings), data=data)
        init = route_batch(trainer.model, tokens_BS, seed=seed, notes=notes)
        trainer.fit(callback=callback)
    model = trainer.model
    trained = route_batch(model, tokens_BS, seed=seed, notes=notes)
    dropless = _dropless_copy(model)  # built once: the router alone, for both modes
    leak = {"train": future_leak(dropless, tokens_BS, train_mode=True, dropless=False, seed=seed),
            "eval": future_leak(dropless, tokens_BS, train_mode=False, dropless=False, seed=seed),
            "eval_capacity": future_leak(model, tokens_BS, train_mode=False, dropless=False, seed=seed)}
    val_loss = trainer.last_eval.loss if trainer.last_eval is not None else float("nan")
    return RouterRun(router, init, trained, trainer.step, val_loss, trainer.throughput(), trainer.history, leak,
                     list(notes))


# --- the comparison ------------------------------------------------------------------------


def describe_routers() -> list[dict[str, str]]:
    """One row per router in ``ROUTERS``: its name, class and the first line of its docstring."""
    rows = []
    for name, cls in ROUTERS.items():
        doc = (cls.__doc__ or "").strip()
        # the first sentence, which may wrap over several lines of the docstring
        first = " ".join(doc.split("\n\n")[0].split())
        rows.append({"router": name, "class": cls.__name__, "what it does": first})
    return rows


def summary_rows(runs: Mapping[str, RouterRun] | Sequence[RouterRun],
                 tolerance: float = CAUSAL_TOLERANCE) -> list[dict[str, Any]]:
    """One plain dict per run: balance on the fixed batch at initialisation and after training
    (averaged over the MoE layers; ``unused`` summed), dropping, gates, causality, loss, speed.

    ``causal_train`` / ``causal_eval``: whether ``future_leak`` (dropless) stayed within
    ``tolerance`` in training / evaluation mode; a router that is not causal at evaluation has a
    validation loss that is not comparable with the causal routers'. ``leak_eval_capacity``: the
    same measurement through the capacity dispatch, as the model was trained and evaluated.
    """
    items = runs.values() if isinstance(runs, Mapping) else runs
    rows = []
    for run in items:
        b0, b1 = run.init.balance(), run.trained.balance()
        rows.append({
            "router": run.router,
            "top_k": run.trained.top_k,
            "causal_train": run.causal("train", tolerance),
            "causal_eval": run.causal("eval", tolerance),
            "max_vio_init": b0["max_vio"], "max_vio_trained": b1["max_vio"],
            "cv_init": b0["cv"], "cv_trained": b1["cv"],
            "entropy_init": b0["entropy"], "entropy_trained": b1["entropy"],
            "unused_init": int(b0["unused_experts"]), "unused_trained": int(b1["unused_experts"]),
            "dropped_init": b0["dropped_fraction"], "dropped_trained": b1["dropped_fraction"],
            "experts_per_token": b1["experts_per_token"],
            "mean_gate": b1["mean_gate"],
            "confidence": b1["router_confidence"],
            "leak_eval_capacity": run.leak["eval_capacity"],
            "val_loss": run.val_loss,
            "tokens_per_s": run.tokens_per_s,
        })
    return rows


def _extreme(rows: Sequence[dict[str, Any]], key: str, lowest: bool = True) -> tuple[float, str]:
    """The lowest (or highest) finite value of ``key`` and the routers that reach it (ties: all)."""
    finite = [r for r in rows if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    if not finite:
        raise ValueError(f"no finite {key!r} in the rows")
    value = (min if lowest else max)(r[key] for r in finite)
    return value, _names(r for r in finite if r[key] == value)


def _names(rows: Iterable[dict[str, Any]]) -> str:
    names = [r["router"] for r in rows]
    return ", ".join(names) if names else "none"


def router_takeaways(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences computed from ``summary_rows``: extremes and counts, nothing else."""
    if not rows:
        return []
    out = []
    (lo, lo_names), (hi, hi_names) = _extreme(rows, "max_vio_trained"), _extreme(rows, "max_vio_trained", False)
    out.append(f"lowest MaxVio after training: {lo_names} ({lo:.3f}); highest: {hi_names} ({hi:.3f})")
    fell = [r for r in rows if r["max_vio_trained"] < r["max_vio_init"]]
    out.append(f"MaxVio fell from initialisation to the end of training for {len(fell)} of {len(rows)} routers: "
               f"{_names(fell)}")
    most, most_names = _extreme(rows, "dropped_trained", lowest=False)
    none_dropped = [r for r in rows if r["dropped_trained"] == 0]
    out.append(f"most assignments dropped after training: {most_names} ({most:.1%}); "
               f"routers that dropped nothing on the batch: {_names(none_dropped)}")
    unused = [r for r in rows if r["unused_trained"] > 0]
    out.append("experts left without any assignment after training: "
               + (", ".join(f"{r['router']} ({r['unused_trained']})" for r in unused) if unused else "none"))
    comparable = [r for r in rows if r["causal_eval"]]
    not_causal = [r for r in rows if not r["causal_eval"]]
    if comparable:
        best, best_names = _extreme(comparable, "val_loss")
        out.append(f"lowest validation loss among the routers that are causal at evaluation (the router alone, "
                   f"dropless): {best_names} ({best:.3f} nats/byte); not comparable (not causal at evaluation): "
                   f"{_names(not_causal)}")
    train_only = [r for r in rows if r["causal_eval"] and not r["causal_train"]]
    if train_only:
        out.append(f"causal at evaluation but not in training (the training loss reads later tokens): "
                   f"{_names(train_only)}")
    via_drops = [r for r in rows if r["causal_eval"] and r["leak_eval_capacity"] > CAUSAL_TOLERANCE]
    if via_drops:
        worst, worst_names = _extreme(via_drops, "leak_eval_capacity", lowest=False)
        out.append(f"causal routers whose earlier logits still moved with later tokens through the capacity "
                   f"dispatch's drops: {len(via_drops)} of {len(comparable)} (largest change {worst_names}, "
                   f"{worst:.3g}): {_names(via_drops)}")
    (fast, fast_names), (slow, slow_names) = _extreme(rows, "tokens_per_s", False), _extreme(rows, "tokens_per_s")
    out.append(f"highest training throughput: {fast_names} ({fast:,.0f} tokens/s); "
               f"lowest: {slow_names} ({slow:,.0f} tokens/s)")
    return out
