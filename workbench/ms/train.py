"""Training the MindSpore model: ``value_and_grad``, AdamW, warmup + cosine, PyNative or GRAPH mode.

    trainer = MSTrainer(preset("tiny"), TrainConfig(steps=300, run_dir="runs/ms"), mode="graph")
    trainer.fit()            # history in trainer.history, also in runs/ms/metrics.jsonl

The same recipe as ``workbench.train.Trainer``, so runs of the two frameworks compare step for step:

- the same initial weights: the PyTorch model is built under ``torch.manual_seed(seed)`` exactly as
  the PyTorch trainer builds it, and converted (``workbench.ms.convert.from_torch``);
- the same batches (``workbench.train.trainer.build_data``: a pure function of seed and step);
- AdamW with decoupled weight decay on matrices only (Loshchilov and Hutter 2019), bias-corrected
  as ``torch.optim.AdamW``; the global gradient norm clipped as ``torch.nn.utils.clip_grad_norm_``;
  the learning rate of ``workbench.train.trainer.lr_factor`` (linear warmup, cosine decay);
- the loss-free bias updated after the optimizer step from the loads of the step;
- metrics rows with the PyTorch trainer's keys (loss, lm_loss, aux_loss, raw/ and weighted/ losses,
  ``L<i>/...`` routing metrics, lr, grad_norm, step_time_s, tokens_per_s, tokens_seen, val/...),
  written to ``metrics.jsonl``, so ``workbench.viz`` and ``workbench.analysis`` read both.

AdamW and clipping are set up here rather than taken from ``mindspore.nn.AdamWeightDecay``, which
has no bias correction (``AdamW`` feeds the correction into the same fused kernel), and
``ops.clip_by_global_norm``, which divides by max(norm, max_norm) where torch divides by
norm + 1e-6: with those the trajectories would differ by design, not by rounding.

``mode="graph"`` compiles the whole step (forward, backward, clipping, update) with ``mindspore.jit``
once; ``"pynative"`` runs the forward and backward op by op and the clipping and update compiled
(as MindSpore's own optimizers run in PyNative: their ``construct`` is decorated with ``jit``).
Not supported (refused by name): ``grad_accum > 1``,
``autocast="bf16"``, and what ``workbench.ms.model.check_supported`` refuses.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from workbench.config import ModelConfig
from workbench.ms._import import require_mindspore
from workbench.train.config import TrainConfig
from workbench.validation import check, check_choice

ms = require_mindspore()
from mindspore import Parameter, Tensor, nn, ops  # noqa: E402

from workbench.moe.balance import BALANCE_LOSSES  # noqa: E402
from workbench.moe.dispatch import expert_capacity  # noqa: E402
from workbench.ms.model import MoELM, check_supported, tune_cpu_runtime, update_router_bias  # noqa: E402

MODES = ("pynative", "graph")
_DEVICE_TARGETS = {"cpu": "CPU", "cuda": "GPU", "npu": "Ascend"}


def set_device(device: str) -> str:
    """Point MindSpore at ``TrainConfig.device`` (cpu -> CPU, cuda -> GPU, npu -> Ascend; auto: as it is)."""
    kind = device.partition(":")[0]
    if kind != "auto":
        check(kind in _DEVICE_TARGETS, "device", "the MindSpore trainer takes auto, cpu, cuda[:N] or npu[:N]", device)
        target, current = _DEVICE_TARGETS[kind], ms.get_context("device_target")
        if target != current:
            try:
                ms.set_device(target, int(device.partition(":")[2] or 0))
            except RuntimeError:  # the runtime started on another device already
                check(False, "device", f"MindSpore already runs on {current} in this process; set the device "
                      "before any MindSpore computation", device)
    return ms.get_context("device_target")


def check_train_config(cfg: TrainConfig) -> None:
    check(cfg.grad_accum == 1, "grad_accum", "the MindSpore trainer takes one micro-batch per step: must be 1",
          cfg.grad_accum)
    check(cfg.autocast in ("auto", "none"), "autocast", "the MindSpore trainer runs fp32: auto or none",
          cfg.autocast)


class AdamW(nn.Cell):
    """``torch.optim.AdamW`` (Loshchilov and Hutter 2019, "Decoupled Weight Decay Regularization"):

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    run by MindSpore's fused ``AdamWeightDecay`` kernel, which has no bias correction
    (p <- p - lr' (m / (sqrt(v) + eps') + wd' p)): the correction goes into its inputs,
    lr' = lr sqrt(1 - b2^t) / (1 - b1^t), eps' = eps sqrt(1 - b2^t), wd' = lr wd / lr', which is the
    same update. Weight decay on matrices only (``ndim >= 2``), as ``workbench.train.trainer.build_optimizer``.
    ``construct(grads, lr)`` updates in place; ``lr`` is a scalar tensor, so GRAPH mode compiles once.
    """

    def __init__(self, params: list, beta1: float, beta2: float, weight_decay: float, eps: float = 1e-8):
        super().__init__()
        self.params = ms.ParameterTuple(params)
        self.m = self.params.clone(prefix="adam_m", init="zeros")
        self.v = self.params.clone(prefix="adam_v", init="zeros")
        self.decay = tuple(float(weight_decay) if len(p.shape) >= 2 else 0.0 for p in params)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = Parameter(Tensor(0.0, ms.float32), name="adam_t", requires_grad=False)
        self.kernel = ops.AdamWeightDecay()

    def construct(self, grads: tuple, lr: Tensor):
        t = self.t + 1.0
        ops.assign(self.t, t)
        bias1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), t)
        bias2_sqrt = ops.sqrt(1.0 - ops.pow(Tensor(self.beta2, ms.float32), t))
        lr_k = lr * bias2_sqrt / bias1
        eps_k = self.eps * bias2_sqrt
        beta1, beta2 = Tensor(self.beta1, ms.float32), Tensor(self.beta2, ms.float32)
        for i in range(len(self.params)):
            decay_k = lr * self.decay[i] / lr_k
            self.kernel(self.params[i], self.m[i], self.v[i], lr_k, beta1, beta2, eps_k, decay_k, grads[i])
        return t


def clip_by_global_norm(grads: tuple, max_norm: float) -> tuple[tuple, Tensor]:
    """``torch.nn.utils.clip_grad_norm_``: g * min(1, max_norm / (||g|| + 1e-6)); ``max_norm=inf`` only measures."""
    norm = ops.sqrt(sum(ops.square(g).sum() for g in grads))
    if max_norm == float("inf"):
        return grads, norm
    coef = ops.minimum(max_norm / (norm + 1e-6), Tensor(1.0, ms.float32))
    return tuple(g * coef for g in grads), norm


class TrainStep:
    """One optimizer step of ``model``: ``step(tokens, targets, lr) -> (loss, lm_loss, aux_loss, grad_norm,
    routing)``, with routing one tuple per MoE layer (``workbench.ms.model.LayerRouting``).

    ``mode="graph"`` compiles it with ``mindspore.jit`` on the first call (and again for a new batch shape).
    """

    def __init__(self, model: MoELM, cfg: TrainConfig, mode: str = "pynative"):
        check_choice("mode", mode, MODES)
        self.model, self.mode = model, mode
        self.params = model.trainable_params()
        self.optimizer = AdamW(self.params, cfg.beta1, cfg.beta2, cfg.weight_decay)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")

        def forward(tokens, targets):
            # every output is returned: MindSpore warns when a compiled graph drops one
            loss, logits, aux_loss, lm_loss, routing = model(tokens, targets)
            return loss, lm_loss, aux_loss, routing, logits

        grad_fn = ms.value_and_grad(forward, None, self.optimizer.params, has_aux=True)
        optimizer = self.optimizer

        def update(grads, lr):
            grads, norm = clip_by_global_norm(grads, max_norm)
            optimizer(grads, lr)
            return norm

        def step(tokens, targets, lr):
            (loss, lm_loss, aux_loss, routing, _), grads = grad_fn(tokens, targets)
            return loss, lm_loss, aux_loss, update(grads, lr), routing

        if mode == "graph":
            self._step = ms.jit(step)
        else:
            # Forward and backward op by op; the update compiled, as MindSpore's own optimizers
            # (``nn.Adam`` and the others decorate their ``construct`` with ``jit``) run in PyNative.
            compiled_update = ms.jit(update)

            def pynative_step(tokens, targets, lr):
                (loss, lm_loss, aux_loss, routing, _), grads = grad_fn(tokens, targets)
                # mutable: a tuple of tensors is otherwise a constant of the graph, recompiled every step
                return loss, lm_loss, aux_loss, compiled_update(ms.mutable(grads), lr), routing

            self._step = pynative_step

    def __call__(self, tokens: Tensor, targets: Tensor, lr: float):
        return self._step(tokens, targets, Tensor(lr, ms.float32))


def to_tensor(batch_tensor) -> Tensor:
    """A (B, S) torch or numpy integer batch as an int32 MindSpore tensor."""
    arr = batch_tensor.numpy() if hasattr(batch_tensor, "numpy") else np.asarray(batch_tensor)
    return Tensor(arr.astype(np.int32))


def routing_info(layer: tuple, batch_shape: tuple[int, int], capacity: int | None = None):
    """A PyTorch ``RoutingInfo`` (CPU tensors) from one MoE layer's MindSpore routing tuple, so the
    workbench's metrics (``workbench.moe.routing_metrics``) and analyses read MindSpore runs unchanged."""
    import torch

    from workbench.moe.types import DispatchStats, RouterOutput, RoutingInfo

    ids, weights, scores, logits, counts, kept, *raw, weighted = (np.asarray(t.asnumpy()) for t in layer)
    T, K = ids.shape
    counts_t, kept_t = torch.from_numpy(counts.astype(np.int64)), torch.from_numpy(kept.astype(np.int64))
    dropped = counts_t.sum() - kept_t.sum()
    # a token lost all its slots when ... only the capacity dispatch drops; its kept counts say how many pairs
    stats = DispatchStats(counts_t, kept_t, dropped, torch.zeros((), dtype=torch.long), capacity)
    out = RouterOutput(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(weights),
                       torch.from_numpy(scores), torch.from_numpy(logits))
    losses = {name: torch.tensor(float(value)) for name, value in zip(BALANCE_LOSSES, raw, strict=True)}
    return RoutingInfo(out, stats, losses, torch.tensor(float(weighted)), batch_shape)


class MSTrainer:
    """Trains the MindSpore ``MoELM(model_cfg)`` as ``cfg`` says (see the module docstring).

    ``mode``: ``"pynative"`` or ``"graph"``. ``data``: anything with ``get_batch(i)`` and
    ``val_batches()`` as ``workbench.data.LMData`` (default: built from ``cfg``, as the PyTorch
    trainer builds it). ``write``: write ``metrics.jsonl`` and ``run.json`` to ``cfg.run_dir``.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, mode: str = "pynative", data: Any = None,
                 write: bool = True, block_rows: int = 64):
        import torch

        from workbench.model import MoELM as TorchMoELM
        from workbench.ms.convert import from_torch
        from workbench.train.loggers import JsonlLogger
        from workbench.train.trainer import build_data

        check_choice("mode", mode, MODES)
        check_supported(model_cfg)
        check_train_config(cfg)
        self.device = set_device(cfg.device)
        tune_cpu_runtime()
        self.model_cfg, self.cfg, self.mode = model_cfg, cfg, mode
        self.data = data if data is not None else build_data(cfg, model_cfg.seq_len)
        torch.manual_seed(cfg.seed)  # the PyTorch trainer's initial weights, exactly
        self.model = from_torch(TorchMoELM(model_cfg), block_rows=block_rows)
        self.step_fn = TrainStep(self.model, cfg, mode)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.run_dir = Path(cfg.run_dir)
        self.metrics_log = None
        if write:
            self.metrics_log = JsonlLogger(self.run_dir / "metrics.jsonl")
            self.metrics_log.path.unlink(missing_ok=True)
        self._step_times: list[float] = []

    def lr(self, step: int) -> float:
        from workbench.train.trainer import lr_factor

        return self.cfg.lr * lr_factor(step, self.cfg)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics row (the PyTorch trainer's keys)."""
        from workbench.moe import step_routing_metrics

        cfg = self.cfg
        batch = self.data.get_batch(self.step)
        tokens, targets = to_tensor(batch.tokens), to_tensor(batch.targets)
        lr = self.lr(self.step)
        t0 = time.perf_counter()
        loss, lm_loss, aux_loss, grad_norm, routing = self.step_fn(tokens, targets, lr)
        loss = float(loss.asnumpy())  # waits for the step: the time below is the whole step
        elapsed = time.perf_counter() - t0
        grad_norm = float(grad_norm.asnumpy())
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RuntimeError(f"training diverged at step {self.step + 1}: loss {loss}, gradient norm {grad_norm}")
        self._update_bias(routing)
        self.step += 1
        self._step_times.append(elapsed)
        row: dict[str, Any] = {"loss": loss, "lm_loss": float(lm_loss.asnumpy()),
                               "aux_loss": float(aux_loss.asnumpy())}
        if routing:
            B, S = tokens.shape
            infos = [routing_info(layer, (B, S), self._capacity(B * S)) for layer in routing]
            row.update(step_routing_metrics(infos, self.model_cfg.moe_layers, self.model_cfg.moe.loss_weights))
        tokens_per_step = cfg.batch_size * self.model_cfg.seq_len
        row.update(step=self.step, lr=lr, grad_norm=grad_norm, step_time_s=elapsed,
                   tokens_per_s=tokens_per_step / elapsed, tokens_seen=self.step * tokens_per_step)
        return row

    def _capacity(self, num_tokens: int) -> int | None:
        m = self.model_cfg.moe
        if m is None or m.dispatch != "capacity":
            return None
        return expert_capacity(num_tokens, m.top_k, m.num_experts, m.capacity_factor)

    def _update_bias(self, routing: tuple) -> None:
        m = self.model_cfg.moe
        if m is None or m.bias_update_rate <= 0:
            return
        for router, layer in zip(self.model.moe_routers(), routing, strict=True):
            load = layer[4].asnumpy()
            if load.sum() > 0:
                update_router_bias(router.bias, load, m.bias_update_rate, m.bias_recenter, m.bias_update_rule)

    def evaluate(self) -> dict[str, float | None]:
        """Validation loss over every validation token and per domain (``val/...`` keys), forward in PyNative."""
        from workbench.ms.model import cross_entropy

        total, count, row = 0.0, 0, {}
        for domain, batches in self.data.val_batches().items():
            loss_sum, n = 0.0, 0
            for batch in batches:
                logits = self.model(to_tensor(batch.tokens))[1]
                targets = to_tensor(batch.targets)
                loss = float(cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).asnumpy())
                loss_sum, n = loss_sum + loss * targets.size, n + targets.size
            if n:
                row[f"val/{domain}"] = loss_sum / n
            total, count = total + loss_sum, count + n
        row["val/loss"] = total / count if count else None
        return row

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``cfg.steps``, evaluating every ``eval_every`` steps and at the end."""
        from workbench.train.rundir import new_run_info, update_run_info

        cfg = self.cfg
        run_info = None
        if self.metrics_log is not None:
            run_info = new_run_info(self.model_cfg.to_dict(), cfg.to_dict())
            run_info["framework"] = f"mindspore {ms.__version__} ({self.mode}, {self.device})"
            update_run_info(self.run_dir, run_info, status="running", step=self.step)
        while self.step < cfg.steps:
            row = self.train_step()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                row.update(self.evaluate())
            self.history.append(row)
            if self.metrics_log is not None:
                self.metrics_log.log(row)
        if run_info is not None:
            update_run_info(self.run_dir, run_info, status="finished", step=self.step)
        return self.history

    def throughput(self, skip: int = 3) -> float:
        """Median tokens per second over the steps run, the first ``skip`` (compilation) left out."""
        times = self._step_times[skip:] or self._step_times
        return self.cfg.batch_size * self.model_cfg.seq_len / float(np.median(times))
