"""``Trainer`` on every rank of a parallel launch: experts split over ranks, the batch shared out.

    torchrun --nproc-per-node 2 -m workbench train --preset small --grad-accum 2 --expert-parallel 2

What one rank does in a step, against the single-process ``Trainer``:

- **Data**: the step's ``grad_accum`` micro-batches are dealt out rank by rank (rank r takes
  micro-batches r, r + N, r + 2N, ... of N ranks), so the global batch, the micro-batches and
  the order of the data are exactly those of one process with the same ``TrainConfig``; only
  who computes each micro-batch changes. ``grad_accum`` must be a multiple of the number of ranks.
- **Forward and backward**: the model is ``MoELM`` with its experts split by
  ``parallelize_model``; every MoE layer exchanges tokens by all-to-all.
- **Gradients**: summed over the ranks that share each parameter (``grads.sync_gradients``),
  clipped by the norm of the whole model (``grads.clip_grad_norm``). Every rank then takes the
  same AdamW step on what it holds.
- **Balancing**: the global-batch aux loss's counts and the loss-free bias loads are all-reduced
  over every rank (``parallelize_layer``), so every rank makes the same bias update.
- **Metrics**: the row logged for a step is the mean over all the step's micro-batches, as one
  process logs it, plus per-rank lists: ``ep/expert_rows`` (each rank's expert load), the rows
  and bytes each rank's all-to-alls sent and received, the seconds they took, and the gradient
  all-reduce's seconds.
- **Files**: only rank 0 checks, clears and writes the run directory (run.json, metrics.jsonl,
  checkpoints, wandb). Checkpoints hold the single-process layout (``state.full_state``), so a
  run saved by P ranks resumes in one process and the other way round (``Trainer.resume`` on
  this class, with any number of ranks).
- **Evaluation**: every rank evaluates every validation batch (the all-to-alls need all ranks in
  every forward), so the numbers are those of one process.

Randomness: every rank starts from the same seed (the same initialisation as one process);
dropout and router jitter, both off by default, then draw the same masks on every rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workbench.config import ModelConfig
from workbench.parallel.context import ParallelContext, current_context
from workbench.parallel.grads import clip_grad_norm, split_parameters, sync_gradients
from workbench.parallel.layer import parallelize_model, sharded_parameters
from workbench.parallel.state import full_state, install_optimizer_slicing
from workbench.train.checkpoint import save_checkpoint
from workbench.train.config import TrainConfig
from workbench.train.loggers import JsonlLogger
from workbench.train.trainer import Trainer, _mean_rows, build_optimizer, lr_factor
from workbench.validation import check


class PeerFailed(RuntimeError):
    """Another rank failed where this one succeeded; that rank printed the reason."""


class RankLost(PeerFailed):
    """A collective failed: another rank did not answer within the timeout (stopped, hung) or is gone
    (its connection closed). The message names the rank where the heartbeats tell it, and rank 0's
    names the last checkpoint."""


def is_collective_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo, NCCL and HCCL raise RuntimeError subclasses)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                                  "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


class _SilentLog(JsonlLogger):
    """The metrics log of ranks other than 0: it writes and rewrites nothing."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        return []


def agree(ctx: ParallelContext, error: BaseException | None) -> None:
    """Every rank learns which ranks failed, so no rank walks on alone into a collective that never
    completes. Rank 0 raises its own error; another rank raises its own only when rank 0 did not fail
    (every rank refusing the same config would print the same line), else ``PeerFailed``, which the
    CLI keeps quiet: rank 0 speaks for the run."""
    import torch.distributed as dist

    flags = ctx.collective_tensor([0.0] * ctx.world_size)
    flags[ctx.rank] = 0.0 if error is None else 1.0
    dist.all_reduce(flags)
    if error is not None and (ctx.is_main or flags[0].item() == 0):
        raise error
    if flags.sum().item() > 0:
        raise PeerFailed("another rank failed while setting up (its error is printed above); this rank stops too")


def summed_over_ranks(ctx: ParallelContext, value: float) -> float:
    """``value`` summed over every rank (every rank must call it)."""
    import torch.distributed as dist

    total = ctx.collective_tensor([value])
    dist.all_reduce(total)
    return float(total.item())


def grad_accum_advice(grad_accum: int, world_size: int, expert_parallel: int, *, resume: bool) -> str:
    """Why ``grad_accum`` does not fit ``world_size`` ranks, and what to do: a new run can take another
    ``--grad-accum``; a resume keeps the run's, so it is told which numbers of ranks fit it."""
    why = (f"must be a multiple of the {world_size} ranks: each rank takes grad_accum / {world_size} of the "
           f"step's micro-batches (the global batch is grad_accum x batch_size sequences, as in one process)")
    if not resume:
        return f"{why}; e.g. --grad-accum {world_size}"
    fits = [n for n in range(2, grad_accum + 1) if grad_accum % n == 0 and n % expert_parallel == 0]
    ranks = (f"on {' or '.join(map(str, fits))} ranks (torchrun --nproc-per-node N ... --expert-parallel "
             f"{expert_parallel}), or " if fits else "")
    return (f"{why}; the run records grad_accum={grad_accum}, which --resume keeps (it sets the global batch): "
            f"resume it {ranks}in one process (workbench train --resume, without torchrun): checkpoints "
            "resume on any number of ranks")


class ExpertParallelTrainer(Trainer):
    """``Trainer`` for one rank of a parallel launch (module docstring); the same arguments and API.

    The parallel layout comes from ``parallel`` or else the context ``init_parallel`` made
    (``current_context``). Build it on every rank with the same configs.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: Any = None, *, overwrite: bool = False,
                 _resume: bool = False, parallel: ParallelContext | None = None):
        ctx = self.parallel = parallel or current_context()
        error: BaseException | None = None
        try:
            ctx.config.check_model(model_cfg.moe)
            check(cfg.grad_accum % ctx.world_size == 0, "grad_accum",
                  grad_accum_advice(cfg.grad_accum, ctx.world_size, ctx.ep_size, resume=_resume), cfg.grad_accum)
            # Only rank 0 checks, clears and writes the run directory; the others build the same trainer
            # and touch nothing there (a resumed trainer is built without writing).
            super().__init__(model_cfg, cfg, data, overwrite=overwrite and ctx.is_main,
                             _resume=_resume or not ctx.is_main)
        except Exception as err:
            error = err
        agree(ctx, error)
        if not ctx.is_main:
            self.metrics_log = _SilentLog(self.metrics_log.path)
        # The model was built whole, from the seed, as one process builds it; now each rank keeps its
        # experts, and the optimizer and schedule are rebuilt over what the rank holds.
        self.model = parallelize_model(self.model, ctx)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        install_optimizer_slicing(self.model, self.optimizer)
        self._replicated, self._sharded = split_parameters(self.model, sharded_parameters(self.model))

    # --- the step --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _peers_answer(self) -> Iterator[None]:
        """Turn a collective that timed out or lost a peer into ``RankLost``, naming the rank that did not
        answer (the heartbeats tell it) and, on rank 0, the last checkpoint, in one sentence."""
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, PeerFailed) or not is_collective_failure(err):
                raise
            ctx = self.parallel
            silent = ctx.heartbeat.silent_ranks() if ctx.heartbeat is not None else []
            silent = [r for r in silent if r != ctx.rank]
            who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}" if silent
                   else "another rank")
            if any(sign in str(err) for sign in ("Connection closed", "Connection reset")):
                what = f"{who} stopped answering: its connection closed (it exited or was killed)"
            else:
                what = (f"{who} did not answer within the collective timeout of {ctx.timeout_s:g} s (stopped, "
                        "hung or gone; see --collective-timeout)")
            if ctx.is_main:
                last = self.last_checkpoint()
                what += (f"; the last checkpoint is {last} (continue with: workbench train --resume --run-dir "
                         f"{self.run_dir})" if last is not None else "; no checkpoint was written yet")
            raise RankLost(what) from err

    def evaluate(self):
        with self._peers_answer():
            return super().evaluate()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: this rank's share of the micro-batches, then the gradients of all ranks."""
        if self.parallel.heartbeat is not None:
            self.parallel.heartbeat.step = self.step + 1  # the step this rank is working on
        with self._peers_answer():
            return self._train_step()

    def _train_step(self) -> dict[str, Any]:
        cfg, model, ctx = self.cfg, self.model, self.parallel
        model.train()
        ctx.stats.reset()
        t0 = time.perf_counter()
        micro_rows = []
        for micro in range(ctx.rank, cfg.grad_accum, ctx.world_size):
            tokens, targets, _ = self._batch(self.step * cfg.grad_accum + micro)
            with self._autocast():
                out = model(tokens, targets)
            # a non-finite loss is caught below, once every rank knows (a rank that stopped here alone
            # would leave the others waiting in the next all-to-all)
            (out.loss / cfg.grad_accum).backward()
            micro_rows.append(self._step_metrics(out))
        grad_sync_s = sync_gradients(self._replicated, self._sharded, ctx)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self._replicated, self._sharded, clip, ctx)
        row = self._mean_over_ranks(_mean_rows(micro_rows))
        if not math.isfinite(row["loss"]):
            self._diverged(f"loss is {row['loss']}")
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        row = self._apply_step(row, grad_norm, t0)
        row.update(self._communication_metrics(grad_sync_s, row["step_time_s"]))
        return row

    def _mean_over_ranks(self, row: dict[str, Any]) -> dict[str, Any]:
        """Each rank's mean row averaged over the ranks: the mean over all the step's micro-batches
        (every rank ran as many), the row one process logs. One all-reduce for the whole row."""
        import torch.distributed as dist

        keys = sorted(row)
        flat: list[float] = []
        for k in keys:
            flat.extend(row[k] if isinstance(row[k], list) else [row[k]])
        values = self.parallel.collective_tensor(flat)
        dist.all_reduce(values)
        values = (values / self.parallel.world_size).tolist()
        out: dict[str, Any] = {}
        i = 0
        for k in keys:
            n = len(row[k]) if isinstance(row[k], list) else 1
            out[k] = values[i:i + n] if isinstance(row[k], list) else values[i]
            i += n
        return out

    def _communication_metrics(self, grad_sync_s: float, step_s: float) -> dict[str, Any]:
        """Per-rank lists (rank order) of what this step's all-to-alls and gradient all-reduce did."""
        import torch.distributed as dist

        ctx = self.parallel
        mine = ctx.collective_tensor([*ctx.stats.as_list(), grad_sync_s, step_s])
        every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(every, mine)
        per_rank = torch.stack(every).t().tolist()  # one list per metric, one value per rank
        names = [*ctx.stats.names(), "grad_sync_s", "step_s"]
        by_name = dict(zip(names, per_rank, strict=True))
        out: dict[str, Any] = {"comm/grad_sync_s": by_name["grad_sync_s"]}
        if ctx.ep_size > 1:
            load = by_name["expert_rows"]
            mean_load = sum(load) / len(load)
            out.update({
                "ep/expert_rows": load,  # token-expert rows each rank's experts computed: device-level load
                "ep/load_max_over_mean": max(load) / mean_load if mean_load else 1.0,
                "ep/rows_sent": by_name["rows_sent"],
                "ep/rows_received": by_name["rows_received"],
                "ep/bytes_sent": by_name["bytes_sent"],
                "ep/bytes_received": by_name["bytes_received"],
                "ep/bytes_moved": sum(by_name["bytes_sent"]),  # every rank's sends: what crossed the network
                "ep/a2a_time_s": by_name["seconds"],
                "ep/a2a_share": sum(s / t for s, t in zip(by_name["seconds"], by_name["step_s"], strict=True))
                / ctx.world_size,
            })
        return out

    def matmul_peak(self) -> float:
        """The sum of every rank's matmul peak, measured at the same time (ranks sharing a CPU share its
        cores): ``throughput`` counts the tokens of all ranks, so MFU divides by all their peaks (one
        rank's peak overstated it N times). Every rank must call it."""
        with self._peers_answer():
            return summed_over_ranks(self.parallel, super().matmul_peak())

    # --- files: rank 0 writes, every rank takes part in the gathers ----------------------

    def save(self):
        """Write a checkpoint in the single-process layout (rank 0); every rank must call it."""
        with self._peers_answer():
            state = full_state(self.model, self.optimizer, self.parallel)
        if state is None:
            return None
        model_state, optimizer_state = state
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.model_cfg.to_dict(), self.cfg.to_dict(), keep=self.cfg.keep_checkpoints,
                               model_state=model_state, optimizer_state=optimizer_state)

    def fit(self, callback: Callable[[Trainer, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """``Trainer.fit`` on rank 0; on the other ranks the same steps, evaluations and checkpoint
        gathers, in the same order, writing nothing. ``callback`` runs on every rank."""
        if self.parallel.is_main:
            return super().fit(callback)
        cfg = self.cfg
        while self.step < cfg.steps:
            row = self.train_step()
            last = self.step == cfg.steps
            if self.step % cfg.eval_every == 0 or last:
                ev = self.evaluate()
                row["val/loss"] = ev.loss
            self.history.append(row)
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save()
            if callback is not None:
                callback(self, row)
        return self.history
