"""The MindSpore commands of ``workbench``: ``parity`` and ``bench mindspore``.

Their flags are the fields of ``ParityArgs`` and ``workbench.ms.bench.MindSporeBenchConfig``. This
module imports MindSpore only when a command runs, so the rest of the CLI works without it, and
without it these commands say so in one line with the install command.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from workbench.cli.common import add_config_flags, add_json_flag, fail, given, write_json
from workbench.config import PRESETS
from workbench.ms.bench import MODES, MindSporeBenchConfig

_PARITY_DESCRIPTION = """\
Check that the MindSpore model computes what the PyTorch model computes, on the same weights and
random inputs, in fp32: operators (embedding, RMSNorm, RoPE, attention, router, experts,
dispatch + combine, each balancing loss, the loss-free bias update), then end to end (logits, loss,
every gradient, one AdamW step, a loss curve from the same initial weights and batches). Prints
max abs / max rel errors against the tolerances and the expert-selection agreement per layer;
exit status 0 when every check passes, 1 when one fails. See workbench.ms.parity.

--generate checks generation instead: a few fixed prompts (code, prose, math, records) greedy-decoded
with a KV cache by PyTorch (workbench.inference.generate) and by MindSpore (workbench.ms.generate),
in PyNative and GRAPH mode (or --mode), from an untrained --preset model or a trained --run-dir.
Prints per prompt whether the tokens are equal, the first step where they differ and whether that
step was a near tie (PyTorch's top-2 logit gap <= 1e-4), and the largest logit difference; exit
status 0 when every prompt matches or differs first at a near tie, 1 otherwise."""


@dataclass(kw_only=True)
class ParityArgs:
    """What ``workbench parity`` checks (``parity_config``, ``run_parity``), one flag each; ``run_parity``
    below checks them, naming the flag."""

    preset: str = field(default="tiny", metadata={"allowed": PRESETS})  # model preset
    router: str = "softmax_topk"  # softmax_topk, switch, sigmoid or uniform
    dispatch: str = "sorted"  # sorted or capacity
    mode: str = field(default="pynative", metadata={"allowed": MODES})  # how MindSpore runs
    batch_size: int = 2  # sequences of the end-to-end batch
    curve_steps: int = 50  # training steps of the loss-curve comparison (0: skip it)
    seed: int = 0  # seed of weights and inputs
    generate: bool = False  # greedy generation parity on fixed prompts instead of the operator suite
    run_dir: Path | None = None  # with --generate: a trained run's model instead of an untrained --preset
    max_new_tokens: int = 32  # with --generate: greedy tokens per prompt


def add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="MindSpore vs PyTorch: operator and end-to-end parity",
                       description=_PARITY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, ParityArgs)
    add_json_flag(p, "also write the report here")
    p.set_defaults(run=_run_parity)


def add_bench(which: argparse._SubParsersAction) -> None:
    """Add ``mindspore`` to the ``bench`` subcommands."""
    p = which.add_parser("mindspore", help="training step time: MindSpore GRAPH and PyNative vs PyTorch eager",
                         description="Time the training step of a preset in MindSpore GRAPH mode, MindSpore "
                                     "PyNative and PyTorch eager, taking turns --steps steps at a time for "
                                     "--rounds rounds; report each median and the ratios to PyTorch "
                                     "(see workbench.ms.bench).",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, MindSporeBenchConfig)
    add_json_flag(p)
    p.set_defaults(run=_run_bench)


def _run_parity(args: argparse.Namespace) -> int:
    prog = "workbench parity"
    a = ParityArgs(**given(args, ParityArgs))
    if a.generate:
        return _run_generation_parity(args, a)
    for name in ("run_dir", "max_new_tokens"):
        if name in given(args, ParityArgs):
            return fail(prog, f"--{name.replace('_', '-')} applies to --generate (generation parity) only")
    try:
        from workbench.ms.parity import parity_config, run_parity
    except ImportError as err:
        return fail(prog, err)
    try:
        if a.mode not in MODES:
            raise ValueError(f"--mode={a.mode!r} is invalid: allowed values are {', '.join(MODES)}")
        if a.batch_size < 1:
            raise ValueError(f"--batch-size={a.batch_size} is invalid: must be >= 1")
        if a.curve_steps < 0:
            raise ValueError(f"--curve-steps={a.curve_steps} is invalid: must be >= 0 (0 skips the curve)")
        cfg = parity_config(a.preset, router=a.router, dispatch=a.dispatch)
        from workbench.ms.model import check_supported

        check_supported(cfg)
    except ValueError as err:
        return fail(prog, err)
    print(f"parity: preset {a.preset}, router {a.router}, dispatch {a.dispatch}, MindSpore {a.mode}", flush=True)
    report = run_parity(cfg, mode=a.mode, seed=a.seed, batch_size=a.batch_size, curve_steps=a.curve_steps)
    print(report.format())
    write_json(args.json, report.to_dict())
    return 0 if report.passed else 1


def _run_generation_parity(args: argparse.Namespace, a: ParityArgs) -> int:
    """``workbench parity --generate``: greedy generation in both frameworks on the parity prompts."""
    prog = "workbench parity --generate"
    flags = given(args, ParityArgs)
    try:
        from workbench.ms.generate import PARITY_PROMPTS, decode_refusal, generation_parity
        from workbench.ms.model import check_supported
    except ImportError as err:
        return fail(prog, err)
    try:
        for name in ("batch_size", "curve_steps"):
            if name in flags:
                raise ValueError(f"--{name.replace('_', '-')} applies to the operator suite, not to --generate")
        if a.run_dir is not None and (given_preset := [n for n in ("preset", "router", "dispatch") if n in flags]):
            raise ValueError(f"--{given_preset[0]} and --run-dir both choose the model: give one")
        if a.mode not in MODES:
            raise ValueError(f"--mode={a.mode!r} is invalid: allowed values are {', '.join(MODES)}")
        if a.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens={a.max_new_tokens} is invalid: must be >= 1")
        model, source = _generation_model(a)
        cfg = model.cfg
        check_supported(cfg)
        if (reason := decode_refusal(cfg)) is not None:
            raise ValueError(reason)
        longest = max(len(p.encode()) for p in PARITY_PROMPTS)
        if longest + a.max_new_tokens > cfg.seq_len:
            raise ValueError(f"--max-new-tokens={a.max_new_tokens} is invalid: the longest parity prompt ({longest} "
                             f"bytes) plus the new tokens must fit the model's seq_len={cfg.seq_len}: at most "
                             f"{cfg.seq_len - longest}")
    except (ValueError, RuntimeError) as err:  # RuntimeError: load_model's CheckpointError
        return fail(prog, err)
    modes = (a.mode,) if "mode" in flags else MODES
    reports = []
    for mode in modes:
        print(f"generation parity: {source}, {a.max_new_tokens} greedy tokens, MindSpore {mode}", flush=True)
        report = generation_parity(model, PARITY_PROMPTS, a.max_new_tokens, mode=mode)
        print(report.format(), flush=True)
        reports.append(report)
    passed = all(r.passed for r in reports)
    write_json(args.json, {"passed": passed, "model": source, "reports": [r.to_dict() for r in reports]})
    return 0 if passed else 1


def _generation_model(a: ParityArgs):
    """The PyTorch model of ``--generate`` and a phrase naming it: a trained run's, or an untrained
    preset seeded with ``--seed``."""
    import torch

    if a.run_dir is not None:
        from workbench.load import load_model

        return load_model(a.run_dir), f"run {a.run_dir}"
    from workbench.model import MoELM
    from workbench.ms.parity import parity_config

    cfg = parity_config(a.preset, router=a.router, dispatch=a.dispatch)
    from workbench.ms.model import check_supported

    check_supported(cfg)  # before building: the one-line refusal names the field
    torch.manual_seed(a.seed)
    return MoELM(cfg).eval(), f"untrained {a.preset} (router {a.router}, dispatch {a.dispatch}, seed {a.seed})"


def _run_bench(args: argparse.Namespace) -> int:
    prog = "workbench bench mindspore"
    cfg = MindSporeBenchConfig(**given(args, MindSporeBenchConfig))
    try:
        from workbench.ms._import import require_mindspore
        from workbench.ms.bench import format_mindspore_bench, run_mindspore_bench

        require_mindspore()
    except ImportError as err:
        return fail(prog, err)
    try:
        result = run_mindspore_bench(cfg.preset, batch_size=cfg.batch_size, steps=cfg.steps, warmup=cfg.warmup,
                                     rounds=cfg.rounds, modes=cfg.modes, log=lambda line: print(line, flush=True))
    except ValueError as err:
        return fail(prog, err)
    print(format_mindspore_bench(result))
    write_json(args.json, result)
    return 0
