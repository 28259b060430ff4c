"""The training loop: AdamW, warmup + cosine, clipping, accumulation, evaluation, checkpoints, metrics.

    trainer = Trainer(preset("tiny"), TrainConfig(steps=300, run_dir="runs/demo"))
    trainer.fit()                     # history in trainer.history, also in runs/demo/metrics.jsonl
    Trainer.resume("runs/demo").fit() # continues bit for bit from the newest good checkpoint

Batches are a pure function of (seed, step), so the data position in a checkpoint is the step.
Loss-free balancing bias updates run right after ``optimizer.step()``, never inside forward.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.config import ModelConfig
from workbench.model import MoELM
from workbench.moe import routing_metrics
from workbench.runtime import tune_cpu_allocator
from workbench.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from workbench.train.config import TrainConfig
from workbench.train.loggers import JsonlLogger, WandbLogger


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and stacked expert matrices) only.

    Norm gains and biases (1-D) are not decayed; the router's balancing bias is a buffer, not
    a parameter, so the optimizer never sees it.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_data(cfg: TrainConfig, seq_len: int):
    """The built-in corpus, or the user's file / folder when ``cfg.data`` names one."""
    from workbench.data import LMData, build_corpus, load_text_corpus

    if cfg.data is None:
        corpus = build_corpus(max_bytes_per_domain=cfg.max_bytes_per_domain)
    else:
        corpus = load_text_corpus(cfg.data)
    return LMData(corpus, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                  val_fraction=cfg.val_fraction, val_windows_per_domain=cfg.eval_windows)


@dataclass
class EvalResult:
    step: int
    loss: float
    loss_per_domain: dict[str, float]
    routing_matrix: torch.Tensor  # (moe layers, domains, experts) token-expert assignment counts
    domains: list[str]


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: Any = None, *, _resume: bool = False):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.run_dir = Path(cfg.run_dir)
        if not _resume and list_checkpoints(self.run_dir):
            raise ValueError(f"run_dir={str(self.run_dir)!r} already holds checkpoints: resume it "
                             "(--resume / Trainer.resume) or choose another run_dir")
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        torch.manual_seed(cfg.seed)
        self.model = MoELM(model_cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.data = data if data is not None else build_data(cfg, model_cfg.seq_len)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        self.metrics_log = JsonlLogger(self.run_dir / "metrics.jsonl")
        if not _resume:
            self.metrics_log.path.unlink(missing_ok=True)
        self._wandb: WandbLogger | None = None
        self._step_times: list[float] = []

    # --- construction from a checkpoint -----------------------------------------------------

    @classmethod
    def resume(cls, run_dir: str | Path, data: Any = None, **overrides: Any) -> Trainer:
        """Continue the run in ``run_dir`` from its newest readable checkpoint, exactly.

        Only settings that do not change the computation may be overridden (``progress``).
        """
        allowed = {"progress"}
        if set(overrides) - allowed:
            raise ValueError(f"cannot override {sorted(set(overrides) - allowed)} when resuming; "
                             f"allowed: {sorted(allowed)}")
        ckpt = load_latest_checkpoint(Path(run_dir))
        if ckpt is None:
            raise CheckpointError(f"no readable checkpoint in {run_dir} to resume from")
        cfg = TrainConfig.from_dict({**ckpt.train_config, "run_dir": str(run_dir), **overrides})
        trainer = cls(ModelConfig.from_dict(ckpt.model_config), cfg, data, _resume=True)
        trainer.model.load_state_dict(ckpt.model_state)
        trainer.optimizer.load_state_dict(ckpt.optimizer_state)
        trainer.scheduler.load_state_dict(ckpt.scheduler_state)
        restore_rng_state(ckpt.rng_state)
        trainer.step = ckpt.step
        trainer.history = trainer.metrics_log.truncate_after(ckpt.step)
        trainer.resumed_from = ckpt.path
        return trainer

    # --- the loop --------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _batch(self, index: int):
        b = self.data.get_batch(index)
        return (b.tokens.to(self.device, non_blocking=True), b.targets.to(self.device, non_blocking=True),
                b.domains)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics row."""
        cfg, model = self.cfg, self.model
        model.train()
        t0 = time.perf_counter()
        micro_rows = []
        for micro in range(cfg.grad_accum):
            tokens, targets, _ = self._batch(self.step * cfg.grad_accum + micro)
            with self._autocast():
                out = model(tokens, targets)
            if not torch.isfinite(out.loss):
                self._diverged(f"loss is {out.loss.item()}")
            (out.loss / cfg.grad_accum).backward()
            micro_rows.append(self._step_metrics(out))
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.update_router_biases()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self.step += 1
        self._step_times.append(elapsed)

        row = _mean_rows(micro_rows)
        tokens_per_step = cfg.grad_accum * cfg.batch_size * self.model_cfg.seq_len
        row.update(step=self.step, lr=lr, grad_norm=grad_norm, step_time_s=elapsed,
                   tokens_per_s=tokens_per_step / elapsed, tokens_seen=self.step * tokens_per_step)
        return row

    def _step_metrics(self, out) -> dict[str, Any]:
        row: dict[str, Any] = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item(),
                               "aux_loss": out.aux_loss.item()}
        if not out.routing:
            return row
        weights = self.model_cfg.moe.loss_weights
        for name in out.routing[0].losses:
            row[f"raw/{name}"] = sum(r.losses[name].item() for r in out.routing) / len(out.routing)
            row[f"weighted/{name}"] = weights[name] * row[f"raw/{name}"]
        max_vios = []
        for layer_idx, info in zip(self.model_cfg.moe_layers, out.routing, strict=True):
            m = routing_metrics(info)
            for name, value in info.losses.items():
                m[name] = value.item()
            max_vios.append(m["max_vio"])
            row.update({f"L{layer_idx}/{k}": v for k, v in m.items()})
        row["max_vio"] = sum(max_vios) / len(max_vios)
        return row

    def _diverged(self, what: str) -> None:
        ckpts = list_checkpoints(self.run_dir)
        last = f"the last good checkpoint is {ckpts[-1][1]}" if ckpts else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what} at step {self.step + 1}; training stopped, {last}")

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Validation loss per domain and the domain x expert routing counts of every MoE layer."""
        model = self.model
        model.eval()
        domains = list(self.data.domains)
        n_layers, E = len(self.model_cfg.moe_layers), (self.model_cfg.moe.num_experts if self.model_cfg.moe else 0)
        counts = torch.zeros(n_layers, len(domains), max(E, 1), dtype=torch.long)
        losses: dict[str, float] = {}
        total_loss, total_tokens = 0.0, 0
        for domain, batches in self.data.val_batches().items():
            loss_sum, n = 0.0, 0
            for batch in batches:
                tokens, targets = batch.tokens.to(self.device), batch.targets.to(self.device)
                with self._autocast():
                    out = model(tokens)
                loss_sum += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(),
                                            reduction="sum").item()
                n += targets.numel()
                domain_T = batch.domains.flatten()
                for li, info in enumerate(out.routing):
                    ids_TK = info.router_output.expert_ids_TK.cpu()
                    domain_TK = domain_T.unsqueeze(1).expand_as(ids_TK)
                    if info.router_output.mask_TK is not None:  # expert choice pads its slots
                        mask = info.router_output.mask_TK.cpu()
                        ids_TK, domain_TK = ids_TK[mask], domain_TK[mask]
                    counts[li].index_put_((domain_TK.flatten(), ids_TK.flatten()), torch.ones(1, dtype=torch.long),
                                          accumulate=True)
            losses[domain] = loss_sum / max(n, 1)
            total_loss, total_tokens = total_loss + loss_sum, total_tokens + n
        model.train()
        self.last_eval = EvalResult(self.step, total_loss / max(total_tokens, 1), losses, counts, domains)
        return self.last_eval

    def fit(self, callback: Callable[[Trainer, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Train to ``cfg.steps``; evaluate and checkpoint on their cadence and at the end.

        ``callback(trainer, row)`` runs after every step, once the row is logged and any
        checkpoint written (live plots in notebooks use it).
        """
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = WandbLogger(cfg.wandb_project, self.run_dir,
                                  {"model": self.model_cfg.to_dict(), "train": cfg.to_dict()})
        bar = _progress(cfg.steps, self.step, cfg.progress)
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                last = self.step == cfg.steps
                if self.step % cfg.eval_every == 0 or last:
                    ev = self.evaluate()
                    row["val/loss"] = ev.loss
                    row.update({f"val/{d}": v for d, v in ev.loss_per_domain.items()})
                self.history.append(row)
                self.metrics_log.log(row)
                self._wandb.log(row, self.step)
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save()
                if callback is not None:
                    callback(self, row)
                if bar is not None:
                    bar.update(1)
                    postfix = {"loss": f"{row['loss']:.3f}"}
                    if "max_vio" in row:
                        postfix["max_vio"] = f"{row['max_vio']:.2f}"
                    bar.set_postfix(postfix)
        finally:
            if bar is not None:
                bar.close()
            self._wandb.finish()
        return self.history

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.model_cfg.to_dict(), self.cfg.to_dict(), keep=self.cfg.keep_checkpoints)

    def throughput(self, skip: int = 3) -> float:
        """Median tokens per second over the steps this process ran, the first ``skip`` left out."""
        times = self._step_times[skip:] or self._step_times
        if not times:
            return float("nan")
        tokens = self.cfg.grad_accum * self.cfg.batch_size * self.model_cfg.seq_len
        return tokens / sorted(times)[len(times) // 2]


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Average micro-batch rows key by key (element-wise for per-expert lists)."""
    if len(rows) == 1:
        return rows[0]
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows]
        if isinstance(value, list):
            out[key] = [sum(col) / len(col) for col in zip(*values, strict=True)]
        else:
            out[key] = sum(values) / len(values)
    return out


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
