"""Step times of the MindSpore model: training steps and single MoE layers, and the benchmark
against PyTorch eager (``workbench bench mindspore``).

Two functions for other benchmarks (the throughput lab calls them), stable in name and keys:

- ``measure_train_step(model_cfg, batch_size, mode, steps, warmup, seed)``: one optimizer step of
  the whole model (forward, backward, clipping, AdamW) on random tokens;
- ``measure_layer(moe_cfg, d_model, tokens, dispatch, mode, backward, repeats, warmup)``: one MoE
  layer's forward (and backward) on random activations.

Both return ``{"step_s_median", "step_s", "mode", "device", "mindspore_version"}`` plus
``tokens_per_step`` or ``tokens``. A step is timed until its result is on the host (``asnumpy``),
so asynchronous devices are timed whole. GRAPH mode compiles during the warmup steps.

``run_mindspore_bench`` times the ``tiny`` preset's training step in MindSpore GRAPH, MindSpore
PyNative and PyTorch eager (``workbench.train.Trainer.train_step``'s work: forward, backward,
clipping, fused AdamW, schedule), the three taking turns ``steps`` at a time for ``rounds`` rounds,
so a busy spell of a shared machine slows all three; ratios are medians over rounds. Each side runs
in its own process, so the frameworks' CPU thread pools never compete with each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from workbench.config import PRESETS, ModelConfig
from workbench.moe.config import MoEConfig
from workbench.ms._import import require_mindspore
from workbench.train.config import TrainConfig
from workbench.validation import check, check_choice, check_int

MODES = ("pynative", "graph")


@dataclasses.dataclass(kw_only=True)
class MindSporeBenchConfig:
    """The arguments of ``run_mindspore_bench`` that ``workbench bench mindspore`` takes, one flag each
    (the comment is its help); ``run_mindspore_bench`` checks them, once MindSpore is there."""

    preset: str = dataclasses.field(default="tiny", metadata={"choices": PRESETS})  # model preset
    batch_size: int = 16  # sequences per step
    steps: int = 5  # timed steps per side and round
    warmup: int = 3  # untimed steps first, per side (GRAPH compiles here)
    rounds: int = 4  # rounds of the sides taking turns
    modes: tuple[str, ...] = dataclasses.field(default=("graph", "pynative"), metadata={
        "allowed": MODES, "help": "comma-separated MindSpore modes to time"})


def _timed(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _result(times: list[float], mode: str) -> dict[str, Any]:
    ms = require_mindspore()
    return {"step_s_median": statistics.median(times), "step_s": times, "mode": mode,
            "device": ms.get_context("device_target"), "mindspore_version": ms.__version__}


def _check(mode: str, steps: int, warmup: int) -> None:
    check_choice("mode", mode, MODES)
    check_int("steps", steps, 1)
    check_int("warmup", warmup, 0)


def train_step_runner(model_cfg: ModelConfig, batch_size: int, mode: str = "graph", seed: int = 0,
                      train_cfg: TrainConfig | None = None) -> Callable[[], float]:
    """A function that runs one training step of the MindSpore model on a fixed random batch and
    returns its loss (on the host, so the step is finished). Weights: ``MoELM.init_weights(seed)``."""
    ms = require_mindspore()
    from workbench.ms.model import MoELM, tune_cpu_runtime
    from workbench.ms.train import TrainStep

    tune_cpu_runtime()
    check_int("batch_size", batch_size, 1)
    check_choice("mode", mode, MODES)
    model = MoELM(model_cfg)
    model.init_weights(seed)
    step = TrainStep(model, train_cfg or TrainConfig(), mode)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model_cfg.vocab_size, (batch_size, model_cfg.seq_len + 1))
    x, y = ms.Tensor(tokens[:, :-1].astype(np.int32)), ms.Tensor(tokens[:, 1:].astype(np.int32))
    lr = (train_cfg or TrainConfig()).lr * 0.1  # a small step: many steps on one batch stay finite

    def run() -> float:
        return float(step(x, y, lr)[0].asnumpy())

    return run


def measure_train_step(model_cfg: ModelConfig, batch_size: int, mode: str = "graph", steps: int = 10,
                       warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Seconds per MindSpore training step of ``MoELM(model_cfg)`` on ``batch_size`` random sequences of
    ``seq_len`` tokens (forward, backward, global-norm clipping, AdamW with ``TrainConfig``'s defaults).

    Returns ``step_s_median``, ``step_s`` (each timed step), ``tokens_per_step``, ``mode``, ``device``
    ("CPU", "GPU" or "Ascend") and ``mindspore_version``. GRAPH mode compiles in the first warmup step.
    """
    _check(mode, steps, warmup)
    run = train_step_runner(model_cfg, batch_size, mode, seed)
    out = _result(_timed(run, steps, warmup), mode)
    out["tokens_per_step"] = batch_size * model_cfg.seq_len
    return out


def measure_layer(moe_cfg: MoEConfig, d_model: int, tokens: int, dispatch: str, mode: str = "pynative",
                  backward: bool = True, repeats: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Seconds per forward (+ backward, to the input and every parameter) of one MindSpore MoE layer of
    ``moe_cfg`` with ``dispatch`` ("sorted" or "capacity") on ``tokens`` random rows of width ``d_model``.

    Returns ``step_s_median``, ``step_s``, ``tokens``, ``mode``, ``device``, ``mindspore_version``.
    """
    ms = require_mindspore()
    from mindspore import ops

    from workbench.ms.model import DISPATCHES, MoELayer, tune_cpu_runtime

    tune_cpu_runtime()
    _check(mode, repeats, warmup)
    check_int("tokens", tokens, 1)
    check_int("d_model", d_model, 1)
    check_choice("dispatch", dispatch, DISPATCHES)
    cfg = dataclasses.replace(moe_cfg, dispatch=dispatch)
    from workbench.ms.model import check_supported

    check_supported(ModelConfig(d_model=d_model, n_heads=1, moe=cfg))
    layer = MoELayer(d_model, cfg)
    rng = np.random.default_rng(0)
    for p in layer.get_parameters():
        p.set_data(ms.Tensor(rng.normal(0, 0.02, p.shape).astype(np.float32)))
    x = ms.Tensor(rng.normal(0, 1, (1, tokens, d_model)).astype(np.float32))
    probe = ms.Tensor(rng.normal(0, 1, (1, tokens, d_model)).astype(np.float32))
    params = layer.trainable_params()

    def forward(x_in):
        y, routing = layer(x_in)
        return (y * probe).sum() + routing[9]

    fn = ms.value_and_grad(forward, 0, params) if backward else forward
    if mode == "graph":
        fn = ms.jit(fn)

    def run() -> None:
        out = fn(x)
        ops.stop_gradient(out[0] if backward else out).asnumpy()

    result = _result(_timed(run, repeats, warmup), mode)
    result["tokens"] = tokens
    return result


# --- the benchmark: MindSpore GRAPH and PyNative vs PyTorch eager ----------------------------------


def _torch_step_runner(model_cfg: ModelConfig, batch_size: int, seed: int) -> Callable[[], float]:
    """One PyTorch eager training step as the trainer takes it, on a fixed random batch."""
    import torch

    from workbench.model import MoELM
    from workbench.train.trainer import build_optimizer, lr_factor

    cfg = TrainConfig(batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    model = MoELM(model_cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 * lr_factor(s, cfg))
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, model_cfg.vocab_size, (batch_size, model_cfg.seq_len + 1)))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def run() -> float:
        model.train()
        out = model(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.finish_optimizer_step()
        return out.loss.item()

    return run


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    ms = require_mindspore()
    from workbench.bench.expert_parallel import machine_info as torch_machine

    info = torch_machine()
    info.update(mindspore=ms.__version__, mindspore_device=ms.get_context("device_target"),
                torch_threads=torch.get_num_threads(), numpy=np.__version__, platform=platform.platform())
    return info


def _side_runner(side: str, model_config: dict[str, Any], batch_size: int) -> Callable[[], float]:
    model_cfg = ModelConfig.from_dict(model_config)
    if side == "torch":
        return _torch_step_runner(model_cfg, batch_size, 0)
    return train_step_runner(model_cfg, batch_size, side.removeprefix("mindspore_"), 0)


def _worker(conn, side: str, model_config: dict[str, Any], batch_size: int) -> None:
    """One side of the benchmark in its own process: build the step, then time ``n`` steps per request."""
    try:
        run = _side_runner(side, model_config, batch_size)
        conn.send(("ready", None))
        while True:
            n = conn.recv()
            if n is None:
                return
            conn.send(("times", _timed(run, n, 0)))
    except Exception as err:  # reported by the parent, with the side's name
        conn.send(("error", f"{type(err).__name__}: {err}"))


def run_mindspore_bench(preset_name: str = "tiny", batch_size: int = 16, steps: int = 5, warmup: int = 3,
                        rounds: int = 4, modes: tuple[str, ...] = ("graph", "pynative"),
                        log: Callable[[str], None] | None = None,
                        model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Training step time of ``preset_name`` in MindSpore (each of ``modes``) and PyTorch eager, taking
    turns ``steps`` steps at a time for ``rounds`` rounds after ``warmup`` untimed steps each.

    Each side runs in a process of its own (spawned; it waits idle while another side runs), so the
    frameworks' thread pools never compete for the cores; both use every core, as they do by default.
    ``model_cfg`` replaces the preset (the notebook's smoke run times a smaller model).
    Returns the machine, the date, the load average before and after, each side's per-round mean step
    times and median, and ``ratio_<mode>`` = median over rounds of (MindSpore / PyTorch step time).
    """
    import multiprocessing

    from workbench.config import preset

    if model_cfg is None:
        model_cfg = preset(preset_name)
    else:
        preset_name = "custom"
    check_int("batch_size", batch_size, 1)
    check_int("steps", steps, 1)
    check_int("rounds", rounds, 1)
    check_int("warmup", warmup, 0)
    check(len(modes) > 0, "modes", "give at least one of " + ", ".join(MODES), modes)
    for mode in modes:
        check_choice("modes", mode, MODES)
    say = log or (lambda line: None)
    load_before = os.getloadavg()
    sides = ["torch"] + [f"mindspore_{mode}" for mode in modes]
    ctx = multiprocessing.get_context("spawn")
    workers: dict[str, Any] = {}

    def ask(side: str, n: int | None) -> list[float]:
        conn = workers[side][0]
        conn.send(n)
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"{side}: {value}")
        return value

    per_round: dict[str, list[float]] = {side: [] for side in sides}
    try:
        for side in sides:  # one at a time, so that building and compiling do not overlap either
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, side, model_cfg.to_dict(), batch_size), daemon=True)
            proc.start()
            workers[side] = (parent, proc)
            kind, value = parent.recv()
            if kind == "error":
                raise RuntimeError(f"{side}: {value}")
            t0 = time.perf_counter()
            if warmup:
                ask(side, warmup)
            say(f"{side}: {warmup} warmup steps in {time.perf_counter() - t0:.1f} s")
        for r in range(rounds):
            for side in sides:
                per_round[side].append(statistics.mean(ask(side, steps)))
            say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1] * 1e3:.0f} ms" for n, v in per_round.items()))
    finally:
        for conn, proc in workers.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    result: dict[str, Any] = {
        "benchmark": "MindSpore vs PyTorch eager: training step time",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "preset": preset_name, "model_config": model_cfg.to_dict(),
        "batch_size": batch_size, "tokens_per_step": batch_size * model_cfg.seq_len,
        "dispatch": model_cfg.moe.dispatch if model_cfg.moe else None,
        "steps_per_round": steps, "rounds": rounds, "warmup_steps": warmup,
        "step_s_per_round": per_round,
        "step_s_median": {name: statistics.median(v) for name, v in per_round.items()},
    }
    for mode in modes:
        ratios = [m / t for m, t in zip(per_round[f"mindspore_{mode}"], per_round["torch"], strict=True)]
        result[f"ratio_{mode}_per_round"] = ratios
        result[f"ratio_{mode}"] = statistics.median(ratios)
    return result


def format_mindspore_bench(result: dict[str, Any]) -> str:
    med = result["step_s_median"]
    lines = [f"{result['preset']}, batch {result['batch_size']} ({result['tokens_per_step']} tokens per step), "
             f"{result['rounds']} rounds of {result['steps_per_round']} steps, "
             f"MindSpore {result['machine']['mindspore']} on {result['machine']['mindspore_device']}, "
             f"torch {result['machine']['torch']}"]
    lines.append(f"  PyTorch eager        {med['torch'] * 1e3:8.1f} ms/step")
    for mode in ("graph", "pynative"):
        if f"mindspore_{mode}" in med:
            lines.append(f"  MindSpore {mode:<10} {med[f'mindspore_{mode}'] * 1e3:8.1f} ms/step   "
                         f"{result[f'ratio_{mode}']:.2f}x PyTorch (median over rounds)")
    return "\n".join(lines)
