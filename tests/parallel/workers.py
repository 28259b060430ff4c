"""What each rank runs in the expert-parallel tests (module-level functions: the spawned processes
import them by name). Each returns plain tensors and numbers; the tests compare them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.moe import MoEConfig, MoELayer
from workbench.moe.balance import assignment_counts
from workbench.parallel.context import ParallelContext
from workbench.parallel.grads import split_parameters, sync_gradients
from workbench.parallel.layer import parallelize_layer, sharded_parameters

D_MODEL, BATCH, SEQ = 8, 2, 6


@dataclass(frozen=True)
class LayerCase:
    """One layer configuration; ``silent_experts`` are never selected (their selection bias is -1e3)."""

    name: str
    router: str = "softmax_topk"
    num_experts: int = 4
    silent_experts: tuple[int, ...] = ()
    aux_loss_scope: str = "micro_batch"
    shared: bool = True

    def moe_config(self) -> MoEConfig:
        biased = self.router in ("softmax_topk", "sigmoid")
        return MoEConfig(num_experts=self.num_experts, top_k=2, expert_hidden=16, router=self.router,
                         aux_loss_weight=0.01, aux_loss_scope=self.aux_loss_scope, seq_aux_loss_weight=0.01,
                         z_loss_weight=1e-3, bias_update_rate=1e-2 if biased else 0.0,
                         num_shared_experts=1 if self.shared else 0)


LAYER_CASES = [
    LayerCase("softmax_topk"),
    LayerCase("sigmoid", router="sigmoid"),
    LayerCase("softmax_topk, expert 3 gets no token", silent_experts=(3,)),
    LayerCase("sigmoid, rank 1's experts get no token", router="sigmoid", silent_experts=(2, 3)),
    LayerCase("one expert per rank", num_experts=2, shared=False),
    LayerCase("expert_choice (padded slots)", router="expert_choice"),
    LayerCase("global-batch aux loss", aux_loss_scope="global_batch"),
]


def _layer(case: LayerCase) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, case.moe_config()).train()
    with torch.no_grad():
        for e in case.silent_experts:
            layer.router.bias[e] = -1e3
    return layer


def _inputs(world_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's tokens and output gradients (every rank draws all of them, to build the reference)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, SEQ, D_MODEL, generator=g) for _ in range(world_size)]
    grads = [torch.randn(BATCH, SEQ, D_MODEL, generator=g) for _ in range(world_size)]
    return xs, grads


def _run(layer: MoELayer, x: torch.Tensor, grad_y: torch.Tensor) -> dict[str, Any]:
    """Forward, backward of sum(y * grad_y) + the weighted balancing losses; what the tests compare."""
    x = x.clone().requires_grad_(True)
    y, info = layer(x)
    ((y * grad_y).sum() + info.weighted_loss).backward()
    return {"y": y.detach(), "x.grad": x.grad, "tokens_per_expert": info.stats.tokens_per_expert,
            **{f"loss/{k}": v.detach() for k, v in info.losses.items()}}


def layer_equivalence(ctx: ParallelContext, cases: list[LayerCase]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """For each case: (expert-parallel value, single-process value) of every output, loss and gradient.

    The single process runs the ranks' token batches one after another as micro-batches of one
    optimizer step (gradients accumulating), which is what the ranks do together in one step.
    """
    out = {}
    for case in cases:
        xs, grad_ys = _inputs(ctx.world_size)

        reference = _layer(case)
        totals = None
        if case.aux_loss_scope == "global_batch":
            # The ranks count the whole global batch at once; a single process has the same counts
            # once all micro-batches are in (its last micro-batch). Give each micro-batch those.
            with torch.no_grad():
                ids = [reference.router(x.reshape(-1, D_MODEL)).expert_ids_TK for x in xs]
            totals = sum(assignment_counts(i, case.num_experts) for i in ids)
        ref_runs = []
        for r, (x, g) in enumerate(zip(xs, grad_ys, strict=True)):
            if totals is not None:
                reference.aux_counts_since_step.copy_(totals - assignment_counts(ids[r], case.num_experts))
            ref_runs.append(_run(reference, x, g))
        ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
        reference.finish_step()

        layer = parallelize_layer(_layer(case), ctx)
        run = _run(layer, xs[ctx.rank], grad_ys[ctx.rank])
        replicated, sharded = split_parameters(layer, sharded_parameters(layer))
        sync_gradients(replicated, sharded, ctx)
        layer.finish_step()

        pairs = {k: (v, ref_runs[ctx.rank][k]) for k, v in run.items()}
        lo = layer.experts.first_expert
        hi = lo + layer.experts.num_experts
        for name, p in layer.named_parameters():
            want = ref_grads[name][lo:hi] if name.startswith("experts.") else ref_grads[name]
            pairs[f"grad/{name}"] = (p.grad.clone(), want)
        if reference.router.bias is not None:
            pairs["router.bias after the step"] = (layer.router.bias.clone(), reference.router.bias.clone())
        out[case.name] = pairs
    return out


def train_runs(ctx: ParallelContext, model_cfg: dict, train_cfg: dict, resume_dir: str | None) -> dict[str, Any]:
    """Train from scratch (``train_cfg``); then, if given, resume ``resume_dir`` (a single-process run)
    to its end. Returns each run's history (loss per step and the parallel metrics)."""
    from workbench.config import ModelConfig
    from workbench.parallel.trainer import ExpertParallelTrainer
    from workbench.train import TrainConfig

    trainer = ExpertParallelTrainer(ModelConfig.from_dict(model_cfg), TrainConfig(**train_cfg))
    out: dict[str, Any] = {"scratch": trainer.fit(), "local_experts": [tuple(p.shape) for p in trainer._sharded]}
    if resume_dir is not None:
        resumed = ExpertParallelTrainer.resume(resume_dir)
        start = out["resumed_from_step"] = resumed.step
        out["resumed"] = [row for row in resumed.fit() if row["step"] > start]
    return out


class _LayerWithANewBuffer(MoELayer):
    """``MoELayer`` as it would be if its constructor registered one more buffer (a decode cache, say)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.register_buffer("decode_cache", torch.full((3,), 7.0))


def parallel_layer_keeps_what_the_constructor_built(ctx: ParallelContext) -> dict[str, Any]:
    """Build a layer whose constructor added a buffer, make it expert parallel, run it: what it holds."""
    torch.manual_seed(0)
    layer = parallelize_layer(_LayerWithANewBuffer(D_MODEL, LAYER_CASES[0].moe_config()).train(), ctx)
    xs, grad_ys = _inputs(ctx.world_size)
    run = _run(layer, xs[ctx.rank], grad_ys[ctx.rank])
    return {"class": type(layer).__name__, "buffers": dict(layer.named_buffers()),
            "dispatch": type(layer.dispatch).__name__, "local_experts": layer.experts.num_experts,
            "first_expert": layer.experts.first_expert, "y_shape": tuple(run["y"].shape)}


def heartbeat_names_the_sleeping_rank(ctx: ParallelContext, sleep_s: float) -> Any:
    """Rank 1 sleeps in Python (its heartbeat thread keeps beating) one step behind rank 0; rank 0's
    collective times out, and the heartbeats name rank 1 by its step. Rank 0 returns what it read."""
    import time

    import torch.distributed as dist

    ctx.heartbeat.step = 5 if ctx.rank == 0 else 4
    ctx.heartbeat._beat()  # the step is published at once, not at the next beat
    if ctx.rank == 1:
        time.sleep(sleep_s)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as err:
        return {"error": str(err), "silent": ctx.heartbeat.silent_ranks()}
    return None
