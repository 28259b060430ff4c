"""The ``workbench`` command: ``train``, ``bench layer``, ``bench train``.

Every field of ``ModelConfig``, ``MoEConfig`` and ``TrainConfig`` is a ``train`` flag
(``--num-experts 16``); the defaults shown by ``--help`` are the ``tiny`` preset's. A bad value
exits with status 2 and one line naming the field and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

from workbench.config import ModelConfig, MoEConfig, preset
from workbench.runtime import tune_cpu_allocator
from workbench.train.config import BALANCE_RECIPES, TrainConfig, balance_recipe


class _Parser(argparse.ArgumentParser):
    """Bad input: exit status 2 and one line naming the problem, no usage dump or traceback."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _usage_error(prog: str, message: str) -> typing.NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- config dataclasses as flags --------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: the flag's help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for line in source.splitlines() if (m := pattern.match(line))}


def _parse_optional(kind: type) -> typing.Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

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
        help_text = f"{comments.get(f.name, '')} (default: {default})".strip()
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kwargs["type"] = kind
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
            kwargs["type"] = _parse_optional(inner)
            kwargs["metavar"] = inner.__name__.upper() + "|none"
        else:  # pragma: no cover - a field type this generator does not know
            continue
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
        names.append(f.name)
    return names


# --- train ------------------------------------------------------------------------------------

_MODEL_FIELDS: list[str] = []
_MOE_FIELDS: list[str] = []
_TRAIN_FIELDS: list[str] = []


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a compact MoE LM", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model preset (default: tiny)")
    p.add_argument("--dense", action="store_true", help="the dense baseline: no MoE layer")
    p.add_argument("--balance", choices=list(BALANCE_RECIPES),
                   help="a load-balancing recipe; explicit loss-weight flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
    p.add_argument("--overwrite", action="store_true", help="delete --run-dir's checkpoints and metrics first")
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
    if train_cfg.data is not None and not Path(train_cfg.data).exists():
        raise ValueError(f"data={train_cfg.data!r} is invalid: the path does not exist")
    return model_cfg, train_cfg


def _run_train(args: argparse.Namespace) -> int:
    from workbench.train import CheckpointError, Trainer, TrainingDiverged

    prog = "workbench train"
    os.environ.setdefault("WANDB_MODE", "offline")  # runs can be synced later with `wandb sync`
    try:
        if args.resume:
            changed = [k for k in _MODEL_FIELDS + _MOE_FIELDS + _TRAIN_FIELDS
                       if k in vars(args) and k not in ("run_dir", "progress")]
            if changed or args.dense or args.balance or args.overwrite:
                _usage_error(prog, "--resume continues a run exactly: only --run-dir and --no-progress may be given")
            run_dir = vars(args).get("run_dir", TrainConfig().run_dir)
            trainer = Trainer.resume(run_dir, progress=vars(args).get("progress", True))
            print(f"resuming {run_dir} from step {trainer.step} ({trainer.resumed_from.name})")
        else:
            model_cfg, train_cfg = configs_from_args(args)
            if args.overwrite:
                _clear_run_dir(Path(train_cfg.run_dir))
            trainer = Trainer(model_cfg, train_cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _usage_error(prog, str(err))

    print(f"model: {trainer.model_cfg.num_params():,} parameters, {trainer.model_cfg.num_active_params():,} active "
          f"per token; data: {', '.join(trainer.data.domains)}; run dir: {trainer.run_dir}")
    try:
        trainer.fit()
    except TrainingDiverged as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    print(summarize(trainer))
    return 0


def _clear_run_dir(run_dir: Path) -> None:
    from workbench.train.checkpoint import list_checkpoints

    for _, path in list_checkpoints(run_dir):
        path.unlink()
    for name in ("metrics.jsonl", "report.png", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    if (run_dir / "wandb").is_dir():
        shutil.rmtree(run_dir / "wandb")


def summarize(trainer) -> str:
    """The end-of-run summary; also writes ``report.png`` and ``summary.json`` to the run dir."""
    from workbench.bench.peak import measure_matmul_peak

    history, ev, cfg = trainer.history, trainer.last_eval, trainer.model_cfg
    lines = [f"run dir: {trainer.run_dir}"]
    tokens_per_s = trainer.throughput()
    peak = measure_matmul_peak(trainer.device)
    mfu = cfg.flops_per_token() * tokens_per_s / peak
    lines.append(f"throughput: {tokens_per_s:,.0f} tokens/s; model FLOP utilisation {100 * mfu:.1f}% of a "
                 f"{peak / 1e9:,.0f} GFLOP/s {trainer.device.type} matmul measured now")
    summary: dict[str, Any] = {"step": trainer.step, "tokens_per_s": tokens_per_s, "mfu": mfu,
                               "matmul_peak_flops": peak, "flops_per_token": cfg.flops_per_token()}
    if ev is not None:
        per_domain = " | ".join(f"{d} {v:.3f}" for d, v in ev.loss_per_domain.items())
        lines.append(f"validation loss at step {ev.step} (nats/byte): {per_domain} | all {ev.loss:.3f}")
        summary.update(val_loss=ev.loss, val_loss_per_domain=ev.loss_per_domain)
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
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return "\n".join(lines)


# --- bench ------------------------------------------------------------------------------------


def _dispatch_list(text: str) -> tuple[str, ...]:
    from workbench.moe import DISPATCHES

    names = tuple(d for d in text.split(",") if d)
    unknown = [d for d in names if d not in DISPATCHES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dispatch {unknown or text!r}; allowed values are "
                                         f"{', '.join(DISPATCHES)}")
    return names


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from workbench.bench.layer import LayerBenchConfig

    bench = sub.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    layer = which.add_parser("layer", help="MoE layer forward+backward vs a dense FFN and the loop reference",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = LayerBenchConfig()
    layer.add_argument("--tokens", type=int, default=defaults.tokens)
    layer.add_argument("--d-model", type=int, default=defaults.d_model)
    layer.add_argument("--expert-hidden", type=int, default=defaults.expert_hidden)
    layer.add_argument("--num-experts", type=int, default=defaults.num_experts)
    layer.add_argument("--top-k", type=int, default=defaults.top_k)
    layer.add_argument("--dispatches", type=_dispatch_list, default=",".join(defaults.dispatches),
                       help="comma-separated dispatch names to time")
    layer.add_argument("--no-unfused", action="store_true",
                       help="skip timing sorted without the fused CPU expert kernel (sorted_unfused)")
    layer.add_argument("--repeats", type=int, default=defaults.repeats)
    layer.add_argument("--warmup", type=int, default=defaults.warmup)
    layer.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"])
    layer.add_argument("--device", default=defaults.device)
    layer.add_argument("--json", type=Path, default=None, help="also write the result here")
    layer.add_argument("--no-allocator-tuning", action="store_true",
                       help="leave glibc's allocator as it is (see workbench.runtime)")

    train = which.add_parser("train", help="training throughput (tokens/s, MFU) of the presets",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--presets", default="tiny,small", help="comma-separated presets")
    train.add_argument("--steps", type=int, default=12, help="optimizer steps timed per preset (3 more warm up)")
    train.add_argument("--batch-size", type=int, default=None, help="default: each preset's training batch")
    train.add_argument("--dense", action="store_true", help="time the dense baselines as well")
    train.add_argument("--json", type=Path, default=None, help="also write the result here")


def _run_bench_layer(args: argparse.Namespace) -> int:
    from workbench.bench.layer import LayerBenchConfig, format_layer_bench, run_layer_bench

    if not args.no_allocator_tuning:
        tune_cpu_allocator()
    cfg = LayerBenchConfig(tokens=args.tokens, d_model=args.d_model, expert_hidden=args.expert_hidden,
                           num_experts=args.num_experts, top_k=args.top_k, dispatches=args.dispatches,
                           compare_unfused=not args.no_unfused, repeats=args.repeats, warmup=args.warmup,
                           dtype=args.dtype, device=args.device)
    result = run_layer_bench(cfg, progress=sys.stdout.isatty())
    print(format_layer_bench(result))
    _write_json(args.json, result.to_dict())
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from workbench.bench.train import format_train_bench, run_train_bench

    presets = [p for p in args.presets.split(",") if p]
    for name in presets:
        try:
            preset(name)
        except ValueError as err:
            _usage_error("workbench bench train", f"--presets: {err}")
    results = run_train_bench(presets, steps=args.steps, batch_size=args.batch_size, dense=args.dense)
    print(format_train_bench(results))
    _write_json(args.json, results)
    return 0


def _write_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="A research workbench for Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _run_train(args)
    if args.command == "bench" and args.bench == "layer":
        return _run_bench_layer(args)
    if args.command == "bench" and args.bench == "train":
        return _run_bench_train(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
