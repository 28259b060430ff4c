"""The ``workbench`` command: ``train``, ``show``, ``sweep``, ``bench layer``, ``bench train``,
``bench expert-parallel``, ``bench throughput``, ``bench model``, ``bench devices``.

Every field of ``ModelConfig``, ``MoEConfig`` and ``TrainConfig`` is a ``train`` flag
(``--num-experts 16``); the defaults shown by ``--help`` are the ``tiny`` preset's.

Every fault is one line on stderr, never a traceback: a bad flag or config value, unusable
data, a device this torch cannot use, a run directory that cannot be written, a checkpoint
that cannot be written or read. Exit status: 0 done, 1 training diverged, 2 any other fault,
130 interrupted (Ctrl-C).

Under torchrun (``torchrun --nproc-per-node N -m workbench train ... --expert-parallel P``) every
rank runs ``train``; rank 0 alone prints the run's lines and writes the run directory, and a
fault on another rank is printed with that rank's number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from workbench.config import ModelConfig, MoEConfig, preset
from workbench.runtime import tune_cpu_allocator
from workbench.train.config import AUTOCAST, BALANCE_RECIPES, DEVICES, TrainConfig, balance_recipe

EXIT_DIVERGED, EXIT_FAULT, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """Bad input: exit status 2 and one line naming the problem, no usage dump or traceback."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(EXIT_FAULT, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: Any) -> int:
    """Print ``<prog>: error: <message>`` as one line and return the bad-input exit status; every
    subcommand (training, bench, parity) reports refused input this way."""
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_FAULT


def _usage_error(prog: str, message: str) -> typing.NoReturn:
    raise SystemExit(fail(prog, message))


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings as one ``workbench: warning: ...`` line each (not file:line plus source)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(
            f"workbench: warning: {_one_line(message)}", file=sys.stderr)
        yield


# --- config dataclasses as flags --------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: the flag's help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for line in source.splitlines() if (m := pattern.match(line))}


# Help for the fields whose definition carries no trailing comment.
_HELP = {
    "vocab_size": "token ids the model embeds; at least 256 for the byte tokenizer",
    "seq_len": "tokens per training sequence (the context length)",
    "d_model": "model (residual stream) width",
    "n_layers": "transformer blocks",
    "n_heads": "attention heads; must divide d_model, with an even head dimension",
    "rope_base": "base of the rotary position embedding angles",
    "norm_eps": "RMSNorm epsilon",
    "dropout": "dropout on the attention and FFN outputs, in [0, 1)",
    "tie_embeddings": "share the embedding matrix with the LM head",
    "num_experts": "routed experts per MoE layer (E)",
    "top_k": "experts each token is routed to (K)",
    "router": "how tokens choose experts",
    "normalize_topk": "renormalise the k selected gates to sum to one (none: the router's default)",
    "dispatch": "how tokens reach their experts (all compute the same function)",
    "num_shared_experts": "experts every token goes through, besides the routed ones",
    "capacity_factor": "capacity dispatch: slots per expert = capacity_factor x T x K / E (none: never drop)",
}


def _choices(field_name: str) -> tuple[str, ...] | None:
    """The allowed values of a choice field, read from the registries and config modules that
    validate it (so help and validation cannot disagree)."""
    if field_name == "router":
        from workbench.moe import ROUTERS
        return tuple(ROUTERS)
    if field_name == "dispatch":
        from workbench.moe import DISPATCHES
        return tuple(DISPATCHES)
    if field_name == "autocast":
        return AUTOCAST
    if field_name == "device":
        return DEVICES
    from workbench.moe import config as moe_config

    choice_tuples = {"drop_policy": moe_config.DROP_POLICIES, "expert_choice_eval": moe_config.EXPERT_CHOICE_EVAL,
                     "capacity_scope": moe_config.CAPACITY_SCOPES, "aux_loss_scope": moe_config.AUX_LOSS_SCOPES,
                     "bias_update_rule": moe_config.BIAS_UPDATE_RULES}
    return choice_tuples.get(field_name)


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(text)


def _parse_optional(kind: type) -> typing.Callable[[str], Any]:
    convert = _parse_bool if kind is bool else kind

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any, title: str,
                      skip: tuple[str, ...] = ()) -> list[str]:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = getattr(defaults, f.name)
        text = comments.get(f.name) or _HELP.get(f.name) or f.name.replace("_", " ")
        choices = _choices(f.name)
        if choices:
            text = f"{text}; one of: {', '.join(choices)}"
        help_text = f"{text} (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kwargs["type"] = kind
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
            kwargs["type"] = _parse_optional(inner)
            kwargs["metavar"] = ("true|false" if inner is bool else inner.__name__.upper()) + "|none"
        else:  # pragma: no cover - a field type this generator does not know
            continue
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
        names.append(f.name)
    return names


# --- train ------------------------------------------------------------------------------------

_MODEL_FIELDS: list[str] = []
_MOE_FIELDS: list[str] = []
_TRAIN_FIELDS: list[str] = []


_TRAIN_DESCRIPTION = """\
Train a compact Mixture-of-Experts language model on the built-in corpus (or on your own text
with --data) and write checkpoints, metrics.jsonl, report.png and summary.json to --run-dir.

Every field of the model, MoE and training configs is a flag; defaults are the tiny preset's.
Start from --preset, apply a --balance recipe, then explicit flags. --resume continues a run
bit for bit from its newest good checkpoint; see a run with `workbench show RUN_DIR`.

Several processes: torchrun --nproc-per-node N -m workbench train ... --expert-parallel P
splits every MoE layer's experts over P ranks (all-to-all of tokens) and shares each step's
micro-batches out over the N ranks (--grad-accum a multiple of N; data parallel over N / P
copies of the experts). Checkpoints keep the one-process layout: any number of ranks resumes them.

Exit status: 0 done (or already finished), 1 training diverged (the last good checkpoint is
kept), 2 a bad value or any other fault (one line on stderr), 130 interrupted by Ctrl-C."""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a compact MoE LM", description=_TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"],
                   help="model preset; one of: tiny, small (default: tiny)")
    p.add_argument("--dense", action="store_true", help="the dense baseline: no MoE layer")
    p.add_argument("--balance", choices=list(BALANCE_RECIPES),
                   help="a load-balancing recipe; explicit loss-weight flags override it; one of: "
                        + ", ".join(BALANCE_RECIPES))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir exactly (a finished run is left as it is)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --run-dir; it is deleted only once the new run has been checked")
    p.add_argument("--expert-parallel", type=int, default=None, metavar="P",
                   help="under torchrun: split each MoE layer's experts over P ranks (P divides num_experts and "
                        "the number of ranks; the rest is data parallelism); default 1, data parallel only")
    base = preset("tiny")
    _MODEL_FIELDS[:] = _add_config_flags(p, ModelConfig, base, "model (ModelConfig)", skip=("moe",))
    _MOE_FIELDS[:] = _add_config_flags(p, MoEConfig, base.moe, "MoE layers (MoEConfig)")
    _TRAIN_FIELDS[:] = _add_config_flags(p, TrainConfig, TrainConfig(), "training (TrainConfig)")


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then balance recipe, then explicit flags; validation errors propagate as ValueError."""
    given = vars(args)
    moe_overrides = balance_recipe(args.balance) if args.balance else {}
    moe_overrides.update({k: given[k] for k in _MOE_FIELDS if k in given})
    model_cfg = preset(args.preset, **moe_overrides)
    model_cfg = ModelConfig(**{**dataclasses.asdict(model_cfg), "moe": None if args.dense else model_cfg.moe,
                               **{k: given[k] for k in _MODEL_FIELDS if k in given}})
    train_cfg = TrainConfig(**{k: given[k] for k in _TRAIN_FIELDS if k in given})
    if train_cfg.data is not None and not Path(train_cfg.data).expanduser().exists():
        raise ValueError(f"data={train_cfg.data!r} is invalid: the path does not exist")
    return model_cfg, train_cfg


def _parallel_launch(args: argparse.Namespace):
    """The parallel context of a torchrun launch (``WORLD_SIZE`` > 1), or None for one process.

    ``--expert-parallel P`` > 1 without such a launch is refused with the command line to use.
    """
    P = args.expert_parallel
    if P is not None and P < 1:
        raise ValueError(f"--expert-parallel={P} is invalid: must be an integer >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if P not in (None, 1):
            raise ValueError(f"--expert-parallel={P} is invalid here: it splits the experts over {P} processes, "
                             f"and this is one; launch with: torchrun --nproc-per-node {P} -m workbench train ... "
                             f"--expert-parallel {P}")
        return None
    from workbench.parallel import init_parallel

    if args.resume:  # the device the run recorded
        from workbench.train.rundir import read_run_info

        info = read_run_info(Path(vars(args).get("run_dir", TrainConfig().run_dir))) or {}
        device = info.get("train_config", {}).get("device", TrainConfig().device)
    else:
        device = vars(args).get("device", TrainConfig().device)
    return init_parallel(expert_parallel=P or 1, device=device)


def _run_train(args: argparse.Namespace) -> int:
    prog = "workbench train"
    try:
        parallel = _parallel_launch(args)
    except (ValueError, RuntimeError) as err:
        _usage_error(prog, str(err))
    if parallel is None:
        return _train(args, prog, None)
    from workbench.parallel import shutdown

    try:
        return _train(args, prog if parallel.is_main else f"{prog} [rank {parallel.rank}]", parallel)
    finally:
        shutdown()


def _train(args: argparse.Namespace, prog: str, parallel) -> int:
    from workbench.train import CheckpointError, Trainer, TrainingDiverged

    trainer_cls, errors = Trainer, (ValueError, OSError, CheckpointError)
    if parallel is not None:
        from workbench.parallel.trainer import ExpertParallelTrainer, PeerFailed

        trainer_cls, errors = ExpertParallelTrainer, (*errors, PeerFailed)
    say = print if parallel is None or parallel.is_main else (lambda *a, **k: None)  # rank 0 speaks for the run
    os.environ.setdefault("WANDB_MODE", "offline")  # runs can be synced later with `wandb sync`
    try:
        if args.resume:
            changed = [k for k in _MODEL_FIELDS + _MOE_FIELDS + _TRAIN_FIELDS
                       if k in vars(args) and k not in ("run_dir", "progress")]
            if changed or args.dense or args.balance or args.overwrite:
                _usage_error(prog, "--resume continues a run exactly: only --run-dir, --no-progress and "
                             "--expert-parallel may be given")
            run_dir = vars(args).get("run_dir", TrainConfig().run_dir)
            trainer = trainer_cls.resume(run_dir, progress=vars(args).get("progress", True))
            if trainer.finished:
                say(f"{run_dir} is finished: step {trainer.step} of {trainer.cfg.steps}, nothing to do and "
                    f"nothing changed (see it with: workbench show {run_dir})")
                return 0
            say(f"resuming {run_dir} from step {trainer.step} ({trainer.resumed_from.name})")
        else:
            model_cfg, train_cfg = configs_from_args(args)
            trainer = trainer_cls(model_cfg, train_cfg, overwrite=args.overwrite)
    except errors as err:
        _usage_error(prog, str(err))

    say(f"model: {trainer.model_cfg.num_params():,} parameters, {trainer.model_cfg.num_active_params():,} active "
        f"per token; data: {', '.join(trainer.data.domains)}; run dir: {trainer.run_dir}", flush=True)
    if parallel is not None:
        say(f"parallel: {parallel.world_size} ranks, expert parallel {parallel.ep_size} x data parallel "
            f"{parallel.dp_size}, {parallel.backend} on {parallel.device.type}", flush=True)
    try:
        trainer.fit()
    except TrainingDiverged as err:
        print(f"{prog}: {_one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"{prog}: {_interrupted(trainer)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors as err:  # a full disk, a run dir that went away...
        _usage_error(prog, f"{err}; training stopped at step {trainer.step}")
    if parallel is not None and not parallel.is_main:
        return 0
    try:
        print(summarize(trainer))
    except OSError as err:
        _usage_error(prog, f"training finished, but writing its summary failed: {err}")
    return 0


def _interrupted(trainer) -> str:
    last = trainer.last_checkpoint()
    if last is None:
        return f"interrupted at step {trainer.step}, before the first checkpoint: nothing to resume"
    return (f"interrupted at step {trainer.step}; the last checkpoint is {last} "
            f"(continue with: workbench train --resume --run-dir {trainer.run_dir})")


def summarize(trainer) -> str:
    """The end-of-run summary; also writes ``report.png`` and ``summary.json`` to the run dir.

    A value that cannot be given (no validation window, no step timed in this process) is
    ``null`` in ``summary.json`` and ``n/a`` with the reason in the text, never 0 or NaN.
    """
    from workbench.bench.peak import measure_matmul_peak
    from workbench.train.rundir import write_json_atomic

    history, ev, cfg = trainer.history, trainer.last_eval, trainer.model_cfg
    lines = [f"run dir: {trainer.run_dir}"]
    tokens_per_s: float | None = trainer.throughput()
    peak = measure_matmul_peak(trainer.device)
    if tokens_per_s is not None and tokens_per_s == tokens_per_s:  # not NaN
        mfu: float | None = cfg.flops_per_token() * tokens_per_s / peak
        lines.append(f"throughput: {tokens_per_s:,.0f} tokens/s; model FLOP utilisation {100 * mfu:.1f}% of a "
                     f"{peak / 1e9:,.0f} GFLOP/s {trainer.device.type} matmul measured now")
    else:
        tokens_per_s = mfu = None
        lines.append("throughput: n/a (no training step ran in this process)")
    summary: dict[str, Any] = {"step": trainer.step, "tokens_per_s": tokens_per_s, "mfu": mfu,
                               "matmul_peak_flops": peak, "flops_per_token": cfg.flops_per_token()}
    if ev is not None:
        parts = [f"{d} {ev.loss_per_domain[d]:.3f}" if d in ev.loss_per_domain else f"{d} n/a"
                 for d in ev.domains]
        overall = f"{ev.loss:.3f}" if ev.loss is not None else "n/a"
        lines.append(f"validation loss at step {ev.step} (nats/byte): {' | '.join(parts)} | all {overall}")
        for d, why in ev.missing.items():
            lines.append(f"  {d}: n/a, {why}")
        summary.update(val_loss=ev.loss, val_loss_per_domain={d: ev.loss_per_domain.get(d) for d in ev.domains},
                       val_missing=dict(ev.missing))
    else:
        lines.append("validation loss: n/a (no evaluation ran in this process)")
        summary.update(val_loss=None, val_missing={"all": "no evaluation ran in this process"})
    tail = history[-10:]
    layers = sorted({k.split("/")[0] for r in tail for k in r if k.startswith("L") and k.endswith("/max_vio")})
    if layers:
        vio = {layer: sum(r[f"{layer}/max_vio"] for r in tail) / len(tail) for layer in layers}
        lines.append(f"MaxVio (mean of the last {len(tail)} steps): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in vio.items()))
        summary["max_vio"] = vio
    try:
        from workbench.viz import training_report

        report = trainer.run_dir / "report.png"
        training_report(history, ev, report)
        lines.append(f"report: {report}")
    except ImportError as err:
        lines.append(f"report skipped: {err}")
    write_json_atomic(trainer.run_dir / "summary.json", summary)
    return "\n".join(lines)


# --- show -------------------------------------------------------------------------------------


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="what a run did, from its files (read only)",
                       description="Print what a training run did: its config, steps, how it ended, the final "
                                   "validation loss per domain, load balance and throughput. Reads the run's files "
                                   "(run.json, checkpoints, metrics.jsonl, summary.json) and changes none of them; "
                                   "works on finished, interrupted and diverged runs.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's folder (workbench train --run-dir)")
    p.add_argument("--json", action="store_true", help="print the same facts as one JSON object")


def _run_show(args: argparse.Namespace) -> int:
    from workbench.train.show import describe_run, format_run

    try:
        info = describe_run(args.run_dir)
    except (ValueError, OSError) as err:
        _usage_error("workbench show", str(err))
    print(json.dumps(info, indent=2, allow_nan=False) if args.json else format_run(info))
    return 0


# --- bench ------------------------------------------------------------------------------------


def _dispatch_list(text: str) -> tuple[str, ...]:
    # the names are checked once, by LayerBenchConfig, with the other flags
    return tuple(d for d in text.split(",") if d)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from workbench.bench.layer import LayerBenchConfig

    bench = sub.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    layer = which.add_parser("layer", help="MoE layer forward+backward vs a dense FFN and the loop reference",
                             description="Time an MoE layer's forward + backward with each dispatch against a "
                                         "dense SwiGLU FFN of the same active FLOPs.",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = LayerBenchConfig()
    layer.add_argument("--tokens", type=int, default=defaults.tokens, help="tokens in the batch (T)")
    layer.add_argument("--d-model", type=int, default=defaults.d_model, help="model width (D)")
    layer.add_argument("--expert-hidden", type=int, default=defaults.expert_hidden, help="expert hidden size (H)")
    layer.add_argument("--num-experts", type=int, default=defaults.num_experts, help="experts (E)")
    layer.add_argument("--top-k", type=int, default=defaults.top_k, help="experts per token (K)")
    layer.add_argument("--dispatches", type=_dispatch_list, default=",".join(defaults.dispatches),
                       help="comma-separated dispatch names to time")
    layer.add_argument("--no-unfused", action="store_true",
                       help="skip timing sorted without the fused CPU expert kernel (sorted_unfused)")
    layer.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds")
    layer.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds first")
    layer.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"], help="parameter dtype")
    layer.add_argument("--device", default=defaults.device, help="auto, cpu, cuda[:N], npu[:N] or mps")
    layer.add_argument("--json", type=Path, default=None, help="also write the result here")
    layer.add_argument("--no-allocator-tuning", action="store_true",
                       help="leave glibc's allocator as it is (see workbench.runtime)")

    train = which.add_parser("train", help="training throughput (tokens/s, MFU) of the presets",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--presets", default="tiny,small", help="comma-separated presets")
    train.add_argument("--steps", type=int, default=24,
                       help="optimizer steps timed per preset (3 more warm up), in rounds of 3")
    train.add_argument("--batch-size", type=int, default=None, help="default: each preset's training batch")
    train.add_argument("--dense", action="store_true",
                       help="time each preset's dense twin as well, taking turns, and report the ratio")
    train.add_argument("--json", type=Path, default=None, help="also write the result here")

    ep = which.add_parser("expert-parallel", help="training tokens/s: 1 process x T threads vs N processes at EP=P",
                          description="Train a preset in one process with --single-threads threads, then on "
                                      "--nprocs gloo processes with one thread each and its experts split over "
                                      "--expert-parallel of them (the same global batch), taking turns for "
                                      "--rounds rounds; report tokens/s, their ratio and the bytes the "
                                      "all-to-alls moved per step.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ep.add_argument("--preset", default="small", choices=["tiny", "small"], help="model preset")
    ep.add_argument("--nprocs", type=int, default=2, help="processes of the parallel side")
    ep.add_argument("--expert-parallel", type=int, default=2, help="ranks the experts are split over")
    ep.add_argument("--single-threads", type=int, default=2, help="torch threads of the single process")
    ep.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    ep.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (a multiple of --nprocs)")
    ep.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side and round")
    ep.add_argument("--warmup", type=int, default=2, help="untimed steps first, per side and round")
    ep.add_argument("--rounds", type=int, default=2, help="rounds of the two sides taking turns")
    ep.add_argument("--json", type=Path, default=None, help="also write the result here")

    from workbench.bench.cli import add_parsers  # the throughput lab: throughput, model, devices

    add_parsers(which)
    from workbench.ms import cli as ms_cli  # MindSpore is imported only when the command runs

    ms_cli.add_bench(which)


def _run_bench_layer(args: argparse.Namespace) -> int:
    from workbench.bench.layer import LayerBenchConfig, format_layer_bench, run_layer_bench

    try:
        cfg = LayerBenchConfig(tokens=args.tokens, d_model=args.d_model, expert_hidden=args.expert_hidden,
                               num_experts=args.num_experts, top_k=args.top_k, dispatches=args.dispatches,
                               compare_unfused=not args.no_unfused, repeats=args.repeats, warmup=args.warmup,
                               dtype=args.dtype, device=args.device)
    except ValueError as err:
        _usage_error("workbench bench layer", str(err))
    if not args.no_allocator_tuning:
        tune_cpu_allocator()
    result = run_layer_bench(cfg, progress=sys.stdout.isatty())
    print(format_layer_bench(result))
    write_json(args.json, result.to_dict())
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from workbench.bench.train import check_train_bench_args, format_train_bench, run_train_bench

    presets = [p for p in args.presets.split(",") if p]
    try:
        check_train_bench_args(presets, steps=args.steps, batch_size=args.batch_size)
    except ValueError as err:
        _usage_error("workbench bench train", str(err))
    results = run_train_bench(presets, steps=args.steps, batch_size=args.batch_size, dense=args.dense)
    print(format_train_bench(results))
    write_json(args.json, results)
    return 0


def _run_bench_expert_parallel(args: argparse.Namespace) -> int:
    from workbench.bench.expert_parallel import format_expert_parallel_bench, run_expert_parallel_bench

    try:
        result = run_expert_parallel_bench(args.preset, nprocs=args.nprocs, expert_parallel=args.expert_parallel,
                                           single_threads=args.single_threads, batch_size=args.batch_size,
                                           grad_accum=args.grad_accum, steps=args.steps, warmup=args.warmup,
                                           rounds=args.rounds, log=lambda line: print(line, flush=True))
    except ValueError as err:
        _usage_error("workbench bench expert-parallel", str(err))
    print(format_expert_parallel_bench(result))
    write_json(args.json, result)
    return 0


# --- sweep -------------------------------------------------------------------------------------


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train a list of configs x seeds, reusing every finished run",
                       description="Train every run of a sweep file (YAML; see workbench.experiments.load_sweep) "
                                   "at every seed. Finished runs are cached under --cache by their full config "
                                   "and the code version, so running the same file again trains nothing new. "
                                   "Writes runs.csv, evals.csv, steps.csv.gz and details.json.gz to --out.")
    p.add_argument("file", type=Path, help="the sweep file (YAML)")
    p.add_argument("--jobs", type=int, help="runs trained at once (default: the file's jobs, else one per core)")
    p.add_argument("--cache", type=Path, help="cache folder (default: the file's cache, else runs/cache)")
    p.add_argument("--out", type=Path, help="results folder (default: the file's out, else runs/sweeps/<file name>)")
    p.add_argument("--dry-run", action="store_true", help="check the file and list the runs; train nothing")


def _run_sweep(args: argparse.Namespace) -> int:
    from workbench.experiments import load_sweep, run_experiments, summary_table

    prog = "workbench sweep"
    try:
        sweep = load_sweep(args.file)
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs={args.jobs} is invalid: must be >= 1")
    except (ValueError, ImportError) as err:
        _usage_error(prog, str(err))
    runs = sum(len(e.seeds or sweep.seeds) for e in sweep.experiments)
    print(f"{len(sweep.experiments)} experiments, {runs} runs; seeds {sweep.seeds}")
    if args.dry_run:
        for e in sweep.experiments:
            print(f"  {e.name}: seeds {list(e.seeds or sweep.seeds)}, {e.train.steps} steps, "
                  f"{e.model.num_params():,} parameters")
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = args.out or sweep.out_dir
    try:
        results = run_experiments(sweep.experiments, sweep.seeds, cache_dir=args.cache or sweep.cache_dir,
                                  jobs=args.jobs or sweep.jobs, log=lambda line: print(line, flush=True))
        results.save(out)
    except (ValueError, OSError) as err:
        _usage_error(prog, str(err))
    print(summary_table(results))
    print(f"wrote {out}/runs.csv, evals.csv, steps.csv.gz, details.json.gz")
    return 0


def write_json(path: Path | None, data: Any) -> None:
    """Write ``data`` as JSON (NaN refused) when ``path`` is given, saying where; the bench and parity
    commands share it."""
    if path is None:
        return
    from workbench.train.rundir import json_safe

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    except OSError as err:
        _usage_error("workbench", f"could not write {path}: {err.strerror or err}")
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="A research workbench for Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_show(sub)
    _add_sweep(sub)
    _add_bench(sub)
    from workbench.ms import cli as ms_cli

    ms_cli.add_parity(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from workbench.ms import cli as ms_cli

    commands = {"train": _run_train, "show": _run_show, "sweep": _run_sweep, "parity": ms_cli.run_parity}
    if args.command == "bench":
        from workbench.bench.cli import RUNNERS as BENCH_RUNNERS

        run = {"layer": _run_bench_layer, "train": _run_bench_train,
               "expert-parallel": _run_bench_expert_parallel, **BENCH_RUNNERS,
               "mindspore": ms_cli.run_bench}[args.bench]
    else:
        run = commands[args.command]
    with _one_line_warnings():
        try:
            return run(args)
        except KeyboardInterrupt:  # Ctrl-C outside training (building the corpus, a benchmark)
            print(f"workbench {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
