"""``workbench train``, ``show`` and ``sweep``: training runs and what they wrote.

Every field of ``ModelConfig``, ``MoEConfig`` and ``TrainConfig`` is a ``train`` flag
(``--num-experts 16``); the defaults shown by ``--help`` are the ``tiny`` preset's. The allowed
values a ``--help`` lists come from each config's ``ALLOWED`` table, which its validation checks.

Under torchrun (``torchrun --nproc-per-node N -m workbench train ... --expert-parallel P``) every
rank runs ``train``; rank 0 alone prints the run's lines and writes the run directory, and a
fault on another rank is printed with that rank's number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from workbench.cli.common import (
    EXIT_DIVERGED,
    EXIT_FAULT,
    EXIT_INTERRUPTED,
    add_config_flags,
    given,
    one_line,
    usage_error,
)
from workbench.cli.common import say as say_on_stdout
from workbench.config import PRESETS, ModelConfig, MoEConfig, preset
from workbench.train.config import BALANCE_RECIPES, TrainConfig, balance_recipe

# Help for the config fields whose definition carries no trailing comment.
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

def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``show`` and ``sweep``; each parser's ``run`` default runs its command."""
    _add_train(sub)
    _add_show(sub)
    _add_sweep(sub)


# --- train ------------------------------------------------------------------------------------


_TRAIN_DESCRIPTION = """\
Train a compact Mixture-of-Experts language model on the built-in corpus (or on your own text
with --data) and write checkpoints, metrics.jsonl, report.png and summary.json to --run-dir.

Every field of the model, MoE and training configs is a flag; defaults are the tiny preset's.
Start from --preset, apply a --balance recipe, then explicit flags. --resume continues a run
bit for bit from its newest good checkpoint; see a run with `workbench show RUN_DIR`.

Fine-tuning: --init-from RUN_OR_FILE starts a new run from another run's weights (or a checkpoint
file, such as `workbench upcycle` writes), with a new optimizer and schedule; every tensor must
have this run's shape. --trainable trains one group and freezes the rest: routers, experts,
attention, non_moe, or non_router (everything but the routers: fine-tuning with frozen routers);
or esft, only the experts selected by their share of --esft-domain's routing (--esft-threshold,
--esft-top-n or --esft-top-p). --train-domains draws the training batches from
some domains only; validation still reports every domain. run.json records what was done.

Several processes: torchrun --nproc-per-node N -m workbench train ... --expert-parallel P
splits every MoE layer's experts over P ranks (all-to-all of tokens) and shares each step's
micro-batches out over the N ranks (--grad-accum a multiple of N, by default N; data parallel over
N / P copies of the experts). Checkpoints keep the one-process layout: any number of ranks resumes
them.

Exit status: 0 done (or already finished), 1 training diverged (the last good checkpoint is
kept), 2 a bad value or any other fault (one line on stderr), 130 interrupted by Ctrl-C,
143 by SIGTERM and 129 by SIGHUP (each as Ctrl-C: one line naming the last checkpoint)."""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a compact MoE LM", description=_TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=list(PRESETS),  # None: tiny, and --resume can tell
                   help=f"model preset; one of: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--dense", action="store_true", help="the dense baseline: no MoE layer")
    p.add_argument("--balance", choices=list(BALANCE_RECIPES),
                   help="a load-balancing recipe; explicit loss-weight flags override it; one of: "
                        + ", ".join(BALANCE_RECIPES))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir exactly (a finished run is left as it is); with --steps N, "
                        "extend it to N steps (the learning-rate schedule then runs to step N)")
    p.add_argument("--accept-data-change", action="store_true",
                   help="with --resume: go on although the data differs from what the run trained on (its "
                        "fingerprint in run.json); the change is recorded there")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --run-dir: only the files it wrote are deleted, once the new run "
                        "has been checked; a folder holding other files but no run is refused")
    p.add_argument("--expert-parallel", type=int, default=None, metavar="P",
                   help="under torchrun: split each MoE layer's experts over P ranks (P divides num_experts and "
                        "the number of ranks; the rest is data parallelism); default 1, data parallel only")
    p.add_argument("--collective-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other ranks before the run stops, "
                        "naming the rank that did not answer (default: 300)")
    base = preset("tiny")
    # one group per config; ModelConfig.moe is the MoEConfig group
    for cls, defaults, title in ((ModelConfig, base, "model (ModelConfig)"),
                                 (MoEConfig, base.moe, "MoE layers (MoEConfig)"),
                                 (TrainConfig, TrainConfig(), "training (TrainConfig)")):
        add_config_flags(p, cls, defaults, title, skip=("moe",), help=_HELP, allowed=getattr(cls, "ALLOWED", {}))
    p.set_defaults(run=_run_train)


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then balance recipe, then explicit flags; validation errors propagate as ValueError."""
    if getattr(args, "accept_data_change", False):
        raise ValueError("--accept-data-change is for --resume: a new run records the data it starts on")
    moe_overrides = balance_recipe(args.balance) if args.balance else {}
    moe_overrides.update(given(args, MoEConfig))
    model_cfg = preset(args.preset or "tiny", **moe_overrides)
    model_cfg = ModelConfig(**{**dataclasses.asdict(model_cfg), "moe": None if args.dense else model_cfg.moe,
                               **given(args, ModelConfig)})
    train_cfg = TrainConfig(**given(args, TrainConfig))
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

    if args.resume and "device" not in vars(args):  # the device the run recorded
        from workbench.train.rundir import read_run_info

        info = read_run_info(Path(vars(args).get("run_dir", TrainConfig().run_dir))) or {}
        recorded = info.get("train_config")
        device = recorded.get("device", TrainConfig().device) if isinstance(recorded, dict) else TrainConfig().device
    else:
        device = vars(args).get("device", TrainConfig().device)
    timeout = args.collective_timeout
    if timeout is not None and not (0 < timeout < float("inf")):
        raise ValueError(f"--collective-timeout={timeout} is invalid: must be a number of seconds > 0")
    return init_parallel(expert_parallel=P or 1, device=device, timeout=timeout)


def _run_train(args: argparse.Namespace) -> int:
    from workbench.train.trainer import stop_on_signals

    with stop_on_signals():  # SIGTERM and SIGHUP end the run as Ctrl-C does
        return _run_train_here(args)


def _launch_rank() -> int:
    """This process's rank in a torchrun launch (0 outside one), known before any process group."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _checked_flags(args: argparse.Namespace):
    """What the flags alone can refuse, checked before any process group starts: the configs (and
    whether they fit in memory) of a new run, or the flags --resume refuses. Returns the configs."""
    if args.resume:
        if "init_from" in vars(args):
            raise ValueError("--init-from starts a new run from another run's weights (new optimizer and schedule), "
                             "--resume continues the run in --run-dir exactly: give one of them")
        refused = _refused_on_resume(args)
        if refused:
            raise ValueError(f"--resume continues a run exactly: {', '.join(refused)} cannot be given (the run "
                             f"records its own); only {', '.join(_RESUME_FLAGS)} may be given")
        return None
    from workbench.resources import check_training_fits
    from workbench.train.trainer import resolve_device

    model_cfg, train_cfg = configs_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "grad_accum" not in vars(args):
        # each rank takes grad_accum / N micro-batches: one each, unless --grad-accum says otherwise
        train_cfg = dataclasses.replace(train_cfg, grad_accum=world)
    # a lower bound, before any tensor: --vocab-size 100000000000 ended in the allocator's traceback;
    # the ranks of a node share its memory (CPU), or each holds at least its share (a GPU each)
    device = resolve_device(train_cfg.device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    check_training_fits(model_cfg, train_cfg, device, shares=max(1, world // local if device.type == "cpu" else world))
    return model_cfg, train_cfg


def _run_train_here(args: argparse.Namespace) -> int:
    prog = "workbench train"
    try:
        configs = _checked_flags(args)
    except ValueError as err:
        if _launch_rank() > 0:  # under torchrun every rank refuses the same flags: rank 0 says so
            raise SystemExit(EXIT_FAULT) from None
        usage_error(prog, str(err))
    try:
        parallel = _parallel_launch(args)
    except (ValueError, RuntimeError) as err:
        usage_error(prog, str(err))
    if parallel is None:
        return _train(args, prog, None, configs)
    from workbench.parallel import shutdown

    try:
        return _train(args, prog if parallel.is_main else f"{prog} [rank {parallel.rank}]", parallel, configs)
    finally:
        shutdown()


def _fault(prog: str, parallel, err: BaseException, message: str) -> typing.NoReturn:
    """The one line of a fault and exit status 2; on a rank other than 0, nothing when the fault is
    another rank's (``PeerFailed``: rank 0 has said what stopped the run, or the failing rank has)."""
    from workbench.parallel.trainer import PeerFailed

    if parallel is not None and not parallel.is_main and isinstance(err, PeerFailed):
        raise SystemExit(EXIT_FAULT)
    usage_error(prog, message)


def _train(args: argparse.Namespace, prog: str, parallel, configs=None) -> int:
    from workbench.train import CheckpointError, Trainer, TrainingDiverged
    from workbench.train.rundir import RunDirBusy

    trainer_cls, errors = Trainer, (ValueError, OSError, CheckpointError)
    if parallel is not None:
        from workbench.parallel.trainer import ExpertParallelTrainer, PeerFailed

        trainer_cls, errors = ExpertParallelTrainer, (*errors, PeerFailed)
    # rank 0 speaks for the run; a closed stdout (| head -1) stops the printing, not the training
    say = say_on_stdout if parallel is None or parallel.is_main else (lambda *a, **k: None)
    os.environ.setdefault("WANDB_MODE", "offline")  # runs can be synced later with `wandb sync`
    try:
        if args.resume:
            refused = _refused_on_resume(args)
            if refused:
                usage_error(prog, f"--resume continues a run exactly: {', '.join(refused)} cannot be given (the "
                             f"run records its own); only {', '.join(_RESUME_FLAGS)} may be given")
            run_dir = vars(args).get("run_dir", TrainConfig().run_dir)
            # the device may change: a run recorded on a GPU goes on here (the function is the same);
            # --steps extends the run
            changes = {k: vars(args)[k] for k in ("device", "steps") if k in vars(args)}
            trainer = trainer_cls.resume(run_dir, progress=vars(args).get("progress", True), **changes,
                                         accept_data_change=args.accept_data_change)
            if trainer.finished:
                say(f"{run_dir} is finished: step {trainer.step} of {trainer.cfg.steps}, nothing to do and "
                    f"nothing changed (see it with: workbench show {run_dir})")
                return 0
            extended = f", extended to {trainer.cfg.steps} steps" if "steps" in changes else ""
            say(f"resuming {run_dir} from step {trainer.step} ({trainer.resumed_from.name}){extended}")
        else:
            model_cfg, train_cfg = configs or _checked_flags(args)
            trainer = trainer_cls(model_cfg, train_cfg, overwrite=args.overwrite)
    except errors as err:
        _fault(prog, parallel, err, str(err))

    say(f"model: {trainer.model_cfg.num_params():,} parameters, {trainer.model_cfg.num_active_params():,} active "
        f"per token; data: {', '.join(trainer.data.domains)}; run dir: {trainer.run_dir}", flush=True)
    for line in _finetuning_lines(trainer):
        say(line, flush=True)
    if parallel is not None:
        say(f"parallel: {parallel.world_size} ranks, expert parallel {parallel.ep_size} x data parallel "
            f"{parallel.dp_size}, {parallel.backend} on {parallel.device.type}", flush=True)
        if not args.resume and "grad_accum" not in vars(args):
            say(f"grad_accum: {trainer.cfg.grad_accum}, one micro-batch per rank (the default under torchrun; "
                "--grad-accum sets another multiple of the number of ranks)", flush=True)
    try:
        trainer.fit()
    except TrainingDiverged as err:
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP
        print(f"{prog}: {_interrupted(trainer, err)}", file=sys.stderr)
        return getattr(err, "exit_status", EXIT_INTERRUPTED)
    except RunDirBusy as err:  # another trainer took the folder since this one was built
        usage_error(prog, str(err))
    except errors as err:  # a full disk, a run dir that went away, a rank that did not answer...
        _fault(prog, parallel, err, f"{err}; training stopped at step {trainer.step}")
    peak = None
    if parallel is not None:
        try:  # every rank measures its peak: MFU divides all ranks' tokens by all ranks' peaks
            peak = trainer.matmul_peak()
        except errors as err:
            _fault(prog, parallel, err, f"training finished, but measuring the matmul peak failed: {err}")
        if not parallel.is_main:
            return 0
    try:
        text = summarize(trainer) if peak is None else summarize(trainer, peak)
    except OSError as err:
        usage_error(prog, f"training finished, but writing its summary failed: {err}")
    say(text)
    return 0


def _finetuning_lines(trainer) -> list[str]:
    """Where the weights came from, which domains train and what is frozen: one line each, when set."""
    cfg, lines = trainer.cfg, []
    if trainer.init_from is not None:
        lines.append(f"init from: {trainer.init_from['path']} (step {trainer.init_from['step']}); new optimizer "
                     "and schedule")
    if cfg.train_domains is not None:
        lines.append(f"training batches from: {', '.join(cfg.train_domains)} (validation: every domain)")
    if cfg.trainable != "all" and trainer.freezing is not None:
        record = trainer.trainable_record
        line = (f"trainable: {cfg.trainable}, {record['parameters']:,} of {record['of']:,} parameters "
                f"({100 * record['parameters'] / max(1, record['of']):.1f}%)")
        if "esft" in record:
            esft = record["esft"]
            line += (f"; ESFT experts for {esft.get('domain', cfg.esft_domain)!r} per MoE layer: "
                     + " | ".join(",".join(map(str, row)) or "-" for row in esft["experts"]))
        lines.append(line)
    return lines


# What --resume accepts: where the run is and how this process runs it, never what it computes.
_RESUME_FLAGS = ("--run-dir", "--device", "--no-progress", "--steps", "--expert-parallel", "--collective-timeout",
                 "--accept-data-change")


def _refused_on_resume(args: argparse.Namespace) -> list[str]:
    """The flags given with --resume that would change the run (its model, data or training)."""
    given_fields = {**given(args, ModelConfig), **given(args, MoEConfig), **given(args, TrainConfig)}
    names = [k for k in given_fields if k not in ("run_dir", "progress", "device", "steps")]
    names += [k for k in ("preset", "balance") if getattr(args, k, None) is not None]
    names += [k for k in ("dense", "overwrite") if getattr(args, k, False)]
    return ["--" + name.replace("_", "-") for name in names]


def _interrupted(trainer, err: BaseException | None = None) -> str:
    by = getattr(err, "signal_name", None)
    stopped = f"interrupted by {by}" if by else "interrupted"
    last = trainer.last_checkpoint()
    if last is None:
        return f"{stopped} at step {trainer.step}, before the first checkpoint: nothing to resume"
    return (f"{stopped} at step {trainer.step}; the last checkpoint is {last} "
            f"(continue with: workbench train --resume --run-dir {trainer.run_dir})")


def summarize(trainer, peak: float | None = None) -> str:
    """The end-of-run summary; also writes ``report.png`` and ``summary.json`` to the run dir.

    ``peak``: the matmul FLOP/s of every process that trained (``trainer.matmul_peak()``, which
    under torchrun every rank must call); measured here when not given.

    A value that cannot be given (no validation window, no step timed in this process) is
    ``null`` in ``summary.json`` and ``n/a`` with the reason in the text, never 0 or NaN.
    """
    from workbench.train.rundir import add_outputs, update_run_info, write_json_atomic

    history, ev, cfg = trainer.history, trainer.last_eval, trainer.model_cfg
    lines = [f"run dir: {trainer.run_dir}"]
    tokens_per_s: float | None = trainer.throughput()
    peak = trainer.matmul_peak() if peak is None else peak
    ranks = getattr(getattr(trainer, "parallel", None), "world_size", 1)
    if tokens_per_s is not None and tokens_per_s == tokens_per_s:  # not NaN
        mfu: float | None = cfg.flops_per_token() * tokens_per_s / peak
        of = f" ({ranks} ranks' peaks summed)" if ranks > 1 else ""
        lines.append(f"throughput: {tokens_per_s:,.0f} tokens/s; model FLOP utilisation {100 * mfu:.1f}% of a "
                     f"{peak / 1e9:,.0f} GFLOP/s {trainer.device.type} matmul measured now{of}")
    else:
        tokens_per_s = mfu = None
        lines.append("throughput: n/a (no training step ran in this process)")
    summary: dict[str, Any] = {"step": trainer.step, "tokens_per_s": tokens_per_s, "mfu": mfu,
                               "matmul_peak_flops": peak, "ranks": ranks, "flops_per_token": cfg.flops_per_token()}
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
    if getattr(trainer, "run_info", None) is not None:  # the run's manifest: what --overwrite deletes
        add_outputs(trainer.run_dir, trainer.run_info, "summary.json", "report.png")
        update_run_info(trainer.run_dir, trainer.run_info)
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
    p.set_defaults(run=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from workbench.train.show import describe_run, describe_sweep, format_run, is_sweep_folder, sweep_runs

    try:
        if is_sweep_folder(args.run_dir):  # a sweep's results folder: its table of runs
            print(sweep_runs(args.run_dir).to_json(orient="records", indent=2) if args.json
                  else describe_sweep(args.run_dir))
            return 0
        info = describe_run(args.run_dir)
    except (ValueError, OSError, ImportError) as err:
        usage_error("workbench show", str(err))
    print(json.dumps(info, indent=2, allow_nan=False) if args.json else format_run(info))
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
    p.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from workbench.experiments import check_folder, load_sweep, run_experiments, summary_table

    prog = "workbench sweep"
    try:
        sweep = load_sweep(args.file)
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs={args.jobs} is invalid: must be >= 1")
        # before any training: a results folder that is a file would fail only once every run is done
        check_folder("--out" if args.out else f"out (in {args.file})", args.out or sweep.out_dir)
        check_folder("--cache" if args.cache else f"cache (in {args.file})", args.cache or sweep.cache_dir)
    except (ValueError, ImportError) as err:
        usage_error(prog, str(err))
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
        usage_error(prog, str(err))
    print(summary_table(results))
    print(f"wrote {out}/runs.csv, evals.csv, steps.csv.gz, details.json.gz (see them with: workbench show {out})")
    diverged = results.runs[results.runs["diverged"].notna()]
    if len(diverged):  # recorded like the others; the exit status says so, as train's does
        print(f"{prog}: {len(diverged)} of {len(results.runs)} runs diverged: "
              + "; ".join(f"{r.name} seed {r.seed}: {r.diverged}" for r in diverged.itertuples()), file=sys.stderr)
        return EXIT_DIVERGED
    return 0

