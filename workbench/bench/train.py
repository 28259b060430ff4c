"""Training throughput of the presets: tokens/s and model FLOP utilisation (MFU).

MFU = flops_per_token x tokens/s / peak, where the peak is a large fp32 matmul timed in the
same process (``workbench.bench.peak``), so a busy machine lowers both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from workbench.bench.peak import measure_matmul_peak
from workbench.config import PRESETS, preset
from workbench.train import TrainConfig, Trainer


@dataclass(kw_only=True)
class TrainBenchConfig:
    """What ``workbench bench train`` times (the arguments of ``run_train_bench`` it takes as flags;
    the comment is the flag's help). Checked as it is built (``check_train_bench_args``)."""

    presets: tuple[str, ...] = field(default=("tiny", "small"), metadata={"allowed": PRESETS})  # comma-separated
    steps: int = 24  # optimizer steps timed per preset (3 more warm up), in rounds of 3
    batch_size: int | None = None  # sequences per step; None: each preset's training batch
    dense: bool = False  # time each preset's dense twin as well, taking turns, and report the ratio

    def __post_init__(self) -> None:
        check_train_bench_args(list(self.presets), steps=self.steps, batch_size=self.batch_size)


def check_train_bench_args(presets: list[str], steps: int, batch_size: int | None) -> None:
    """``ValueError`` naming the bad argument: no preset or an unknown one, steps or batch_size < 1."""
    if not presets:
        raise ValueError("presets=[] is invalid: give at least one preset, e.g. tiny,small")
    for name in presets:
        preset(name)
    if steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: must be >= 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be >= 1 (or leave it unset)")


def run_train_bench(presets: list[str], steps: int = 24, warmup: int = 3, batch_size: int | None = None,
                    dense: bool = False, steps_per_round: int = 3) -> dict[str, Any]:
    """Time ``steps`` optimizer steps (after ``warmup``) of each preset on the built-in corpus.

    With ``dense``, each preset's dense twin (``moe=None``: the same model with a dense FFN of
    ``dense_hidden``) trains beside it, and the variants take turns, ``steps_per_round`` steps at
    a time, so a busy machine slows both alike: ``vs_dense`` is the median over rounds of the
    MoE's tokens/s over its twin's in the same round.
    """
    check_train_bench_args(presets, steps, batch_size)
    variants = [(name, False) for name in presets] + ([(name, True) for name in presets] if dense else [])
    trainers: dict[tuple[str, bool], Trainer] = {}
    with tempfile.TemporaryDirectory() as root:
        for i, (name, is_dense) in enumerate(variants):
            model_cfg = preset(name)
            if is_dense:
                model_cfg = model_cfg.replace(moe=None)
            cfg = TrainConfig(steps=warmup + steps, run_dir=f"{root}/{i}", progress=False,
                              **({"batch_size": batch_size} if batch_size is not None else {}))
            trainers[name, is_dense] = Trainer(model_cfg, cfg)
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer.train_step()
        round_seconds: dict[tuple[str, bool], list[float]] = {key: [] for key in trainers}
        done = 0
        while done < steps:
            n = min(steps_per_round, steps - done)
            for key, trainer in trainers.items():
                t0 = time.perf_counter()
                for _ in range(n):
                    trainer.train_step()
                round_seconds[key].append((time.perf_counter() - t0) / n)
            done += n

    results: dict[str, Any] = {"runs": [], "steps": steps, "steps_per_round": steps_per_round}
    for (name, is_dense), trainer in trainers.items():
        model_cfg, cfg = trainer.model_cfg, trainer.cfg
        tokens_per_step = cfg.grad_accum * cfg.batch_size * model_cfg.seq_len
        run = {
            "preset": name + (" (dense)" if is_dense else ""), "batch_size": cfg.batch_size,
            "seq_len": model_cfg.seq_len, "params": model_cfg.num_params(),
            "active_params": model_cfg.num_active_params(), "flops_per_token": model_cfg.flops_per_token(),
            "tokens_per_s": tokens_per_step / statistics.median(round_seconds[name, is_dense]),
            "device": str(trainer.device),
        }
        if dense and not is_dense:
            per_round = [d / m for m, d in zip(round_seconds[name, False], round_seconds[name, True], strict=True)]
            run["vs_dense"] = statistics.median(per_round)
            run["vs_dense_per_round"] = per_round
        results["runs"].append(run)
    peak = measure_matmul_peak(next(iter(trainers.values())).device)
    results["matmul_peak_flops"] = peak
    for run in results["runs"]:
        run["mfu"] = run["flops_per_token"] * run["tokens_per_s"] / peak
    return results


def format_train_bench(results: dict[str, Any]) -> str:
    peak = results["matmul_peak_flops"]
    lines = [f"training throughput; MFU against a {peak / 1e9:,.0f} GFLOP/s matmul measured in this run",
             f"{'preset':<14} {'params':>11} {'active':>11} {'batch':>9} {'tokens/s':>10} {'MFU':>7} {'vs dense':>9}"]
    for r in results["runs"]:
        vs_dense = f"{r['vs_dense']:.3f}x" if "vs_dense" in r else ""
        lines.append(f"{r['preset']:<14} {r['params']:>11,} {r['active_params']:>11,} "
                     f"{r['batch_size']:>4}x{r['seq_len']:<4} {r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>6.1f}% "
                     f"{vs_dense:>9}")
    if any("vs_dense" in r for r in results["runs"]):
        lines.append(f"vs dense: median over {len(results['runs'][0].get('vs_dense_per_round', []))} rounds of "
                     "the MoE's tokens/s over its dense twin's, the two taking turns")
    return "\n".join(lines)
