"""A short training run per router, measured on one fixed batch before and after.

``train_router`` trains with the workbench's ``Trainer`` and keeps what a comparison of routers
needs: the fixed batch routed at initialisation and after training (``measure.route_batch``),
the validation loss, the throughput and the causality measurements (``causality.future_leak``).
``report.summary_rows`` turns runs into a table.

Shape legend: B sequences, S positions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.analysis.causality import CAUSAL_TOLERANCE, dropless_copy, future_leak
from workbench.analysis.measure import (
    DEFAULT_CAPACITY_FACTOR,
    BatchRouting,
    catch_causal_warnings,
    route_batch,
    router_config,
)
from workbench.config import ModelConfig
from workbench.data import LMData


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
        with catch_causal_warnings(notes):
            trainer = Trainer(cfg, TrainConfig(**settings), data=data)
        init = route_batch(trainer.model, tokens_BS, seed=seed, notes=notes)
        trainer.fit(callback=callback)
    model = trainer.model
    trained = route_batch(model, tokens_BS, seed=seed, notes=notes)
    dropless = dropless_copy(model)  # built once: the router alone, for both modes
    leak = {"train": future_leak(dropless, tokens_BS, train_mode=True, dropless=False, seed=seed),
            "eval": future_leak(dropless, tokens_BS, train_mode=False, dropless=False, seed=seed),
            "eval_capacity": future_leak(model, tokens_BS, train_mode=False, dropless=False, seed=seed)}
    val_loss = trainer.last_eval.loss if trainer.last_eval is not None else float("nan")
    return RouterRun(router, init, trained, trainer.step, val_loss, trainer.throughput(), trainer.history, leak,
                     list(notes))
