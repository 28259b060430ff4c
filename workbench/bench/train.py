"""Training throughput of the presets: tokens/s and model FLOP utilisation (MFU).

MFU = flops_per_token x tokens/s / peak, where the peak is a large fp32 matmul timed in the
same process (``workbench.bench.peak``), so a busy machine lowers both alike.
"""

from __future__ import annotations

import tempfile
from typing import Any

from workbench.bench.peak import measure_matmul_peak
from workbench.config import preset
from workbench.train import TrainConfig, Trainer


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


def run_train_bench(presets: list[str], steps: int = 12, warmup: int = 3, batch_size: int | None = None,
                    dense: bool = False) -> dict[str, Any]:
    """Time ``steps`` optimizer steps (after ``warmup``) of each preset on the built-in corpus."""
    check_train_bench_args(presets, steps, batch_size)
    results: dict[str, Any] = {"runs": []}
    variants = [(name, False) for name in presets] + ([(name, True) for name in presets] if dense else [])
    for name, is_dense in variants:
        model_cfg = preset(name)
        if is_dense:
            model_cfg = model_cfg.replace(moe=None)
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = TrainConfig(steps=warmup + steps, run_dir=run_dir, progress=False,
                              **({"batch_size": batch_size} if batch_size is not None else {}))
            trainer = Trainer(model_cfg, cfg)
            for _ in range(warmup + steps):
                trainer.train_step()
            tokens_per_s = trainer.throughput(skip=warmup)
        results["runs"].append({
            "preset": name + (" (dense)" if is_dense else ""), "batch_size": cfg.batch_size,
            "seq_len": model_cfg.seq_len, "params": model_cfg.num_params(),
            "active_params": model_cfg.num_active_params(), "flops_per_token": model_cfg.flops_per_token(),
            "tokens_per_s": tokens_per_s, "device": str(trainer.device),
        })
    peak = measure_matmul_peak(trainer.device)
    results["matmul_peak_flops"] = peak
    for run in results["runs"]:
        run["mfu"] = run["flops_per_token"] * run["tokens_per_s"] / peak
    return results


def format_train_bench(results: dict[str, Any]) -> str:
    peak = results["matmul_peak_flops"]
    lines = [f"training throughput; MFU against a {peak / 1e9:,.0f} GFLOP/s matmul measured in this run",
             f"{'preset':<14} {'params':>11} {'active':>11} {'batch':>9} {'tokens/s':>10} {'MFU':>7}"]
    for r in results["runs"]:
        lines.append(f"{r['preset']:<14} {r['params']:>11,} {r['active_params']:>11,} "
                     f"{r['batch_size']:>4}x{r['seq_len']:<4} {r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>6.1f}%")
    return "\n".join(lines)
