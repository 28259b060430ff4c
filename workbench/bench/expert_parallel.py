"""Expert-parallel training throughput: one process with T threads against N processes with one each.

    workbench bench expert-parallel --preset small --json benchmarks/expert-parallel-cpu2.json

Both sides train the same preset with the same ``TrainConfig`` (``grad_accum`` micro-batches of
``batch_size`` sequences per step: the same global batch), so their tokens per second compare
directly:

- **single**: ``Trainer`` in one process with ``single_threads`` intra-op threads;
- **expert parallel**: ``ExpertParallelTrainer`` on ``nprocs`` gloo processes on 127.0.0.1, one
  thread each, the experts split over ``expert_parallel`` of them; it also reports the bytes
  its all-to-alls moved per step (every rank's sends to other ranks), their share of the step
  time, and each rank's expert load.

Every side runs in freshly spawned processes (start-up is not timed), ``warmup`` steps first.
The sides take turns for ``rounds`` rounds, so a busy spell of a shared machine hits both; the
ratio is the median over rounds of (expert-parallel tokens/s) / (single tokens/s) of the round.
The result records the machine, the date and the load average before and after: run it on a
quiet machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
from typing import Any

import torch

from workbench.validation import check, check_int


def _time_training(ctx, preset_name: str, batch_size: int, grad_accum: int, warmup: int, steps: int,
                   parallel: bool) -> dict[str, Any]:
    """Runs on every spawned process: ``warmup + steps`` optimizer steps; the timed steps' figures."""
    from workbench.config import preset
    from workbench.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory(prefix="workbench-bench-ep-") as root:
        cfg = TrainConfig(steps=warmup + steps, batch_size=batch_size, grad_accum=grad_accum, run_dir=root,
                          progress=False)
        if parallel:
            from workbench.parallel.trainer import ExpertParallelTrainer

            trainer: Trainer = ExpertParallelTrainer(preset(preset_name), cfg, parallel=ctx)
        else:
            trainer = Trainer(preset(preset_name), cfg)
        rows = [trainer.train_step() for _ in range(warmup + steps)][warmup:]
    out: dict[str, Any] = {"step_s": [r["step_time_s"] for r in rows], "threads": torch.get_num_threads(),
                           "tokens_per_step": grad_accum * batch_size * trainer.model_cfg.seq_len}
    if "ep/bytes_moved" in rows[0]:
        out.update(bytes_moved_per_step=statistics.median(r["ep/bytes_moved"] for r in rows),
                   a2a_share=statistics.median(r["ep/a2a_share"] for r in rows),
                   a2a_time_s_per_rank=[statistics.median(col) for col in zip(*(r["ep/a2a_time_s"] for r in rows),
                                                                              strict=True)],
                   grad_sync_s_per_rank=[statistics.median(col) for col in zip(*(r["comm/grad_sync_s"] for r in rows),
                                                                               strict=True)],
                   expert_rows_per_rank=rows[-1]["ep/expert_rows"],
                   load_max_over_mean=statistics.median(r["ep/load_max_over_mean"] for r in rows))
    return out


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    from workbench.kernels import cpu as cpu_kernels

    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "fused_cpu_kernel": cpu_kernels.enabled() and cpu_kernels.kernel_available()}


def run_expert_parallel_bench(preset: str = "small", *, nprocs: int = 2, expert_parallel: int = 2,
                              single_threads: int = 2, batch_size: int = 16, grad_accum: int = 2, steps: int = 6,
                              warmup: int = 2, rounds: int = 2, log=print) -> dict[str, Any]:
    """Time both sides (module docstring); returns the JSON-ready result."""
    from workbench.config import preset as build_preset
    from workbench.parallel import ParallelConfig
    from workbench.parallel.launch import run_local

    for name, value, minimum in (("nprocs", nprocs, 1), ("single_threads", single_threads, 1),
                                 ("batch_size", batch_size, 1), ("steps", steps, 1), ("warmup", warmup, 0),
                                 ("rounds", rounds, 1)):
        check_int(name, value, minimum)
    ParallelConfig(world_size=nprocs, expert_parallel=expert_parallel).check_model(build_preset(preset).moe)
    check(grad_accum % nprocs == 0, "grad_accum", f"must be a multiple of nprocs={nprocs}", grad_accum)

    load_before = os.getloadavg()
    args = (preset, batch_size, grad_accum, warmup, steps)
    single_runs, parallel_runs, ratios = [], [], []
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}: 1 process x {single_threads} threads")
        single = run_local(_time_training, nprocs=1, args=(*args, False), threads=single_threads)[0]
        log(f"round {r + 1}/{rounds}: {nprocs} processes x 1 thread, expert_parallel={expert_parallel}")
        parallel = run_local(_time_training, nprocs=nprocs, args=(*args, True), expert_parallel=expert_parallel,
                             threads=1)[0]
        single_runs.append(single)
        parallel_runs.append(parallel)
        ratios.append(statistics.median(single["step_s"]) / statistics.median(parallel["step_s"]))

    tokens = single_runs[0]["tokens_per_step"]

    def tokens_per_s(runs):
        return tokens / statistics.median(s for run in runs for s in run["step_s"])

    last = parallel_runs[-1]
    return {
        "benchmark": "expert-parallel training throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "preset": preset, "batch_size": batch_size, "grad_accum": grad_accum, "tokens_per_step": tokens,
        "steps_timed_per_round": steps, "warmup_steps": warmup, "rounds": rounds,
        "single": {"processes": 1, "threads": single_threads, "tokens_per_s": tokens_per_s(single_runs),
                   "step_s": [run["step_s"] for run in single_runs]},
        "expert_parallel": {"processes": nprocs, "threads_per_process": 1, "expert_parallel": expert_parallel,
                            "data_parallel": nprocs // expert_parallel, "tokens_per_s": tokens_per_s(parallel_runs),
                            "step_s": [run["step_s"] for run in parallel_runs],
                            **{k: last[k] for k in ("bytes_moved_per_step", "a2a_share", "a2a_time_s_per_rank",
                                                    "grad_sync_s_per_rank", "expert_rows_per_rank",
                                                    "load_max_over_mean") if k in last}},
        "ratio": statistics.median(ratios), "ratio_per_round": ratios, "target_ratio": 0.8,
    }


def format_expert_parallel_bench(result: dict[str, Any]) -> str:
    s, p = result["single"], result["expert_parallel"]
    lines = [f"{result['preset']}: {result['grad_accum']} x {result['batch_size']} sequences per step "
             f"({result['tokens_per_step']:,} tokens), {result['rounds']} rounds of {result['steps_timed_per_round']} "
             "steps",
             f"  1 process x {s['threads']} threads:  {s['tokens_per_s']:,.0f} tokens/s",
             f"  {p['processes']} processes x 1 thread (EP={p['expert_parallel']}, DP={p['data_parallel']}): "
             f"{p['tokens_per_s']:,.0f} tokens/s",
             f"  ratio {result['ratio']:.3f}x (median over rounds; target >= {result['target_ratio']}x)"]
    if "bytes_moved_per_step" in p:
        lines.append(f"  all-to-all: {p['bytes_moved_per_step'] / 1e6:,.1f} MB moved per step, "
                     f"{100 * p['a2a_share']:.1f}% of the step; expert load max/mean {p['load_max_over_mean']:.3f}")
    return "\n".join(lines)
