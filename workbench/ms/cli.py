"""The MindSpore commands of ``workbench``: ``parity`` and ``bench mindspore``.

``workbench.cli`` registers them; this module imports MindSpore only when a command runs, so the
rest of the CLI works without it, and without it these commands say so in one line with the
install command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli import fail, write_json

_PARITY_DESCRIPTION = """\
Check that the MindSpore model computes what the PyTorch model computes, on the same weights and
random inputs, in fp32: operators (embedding, RMSNorm, RoPE, attention, router, experts,
dispatch + combine, each balancing loss, the loss-free bias update), then end to end (logits, loss,
every gradient, one AdamW step, a loss curve from the same initial weights and batches). Prints
max abs / max rel errors against the tolerances and the expert-selection agreement per layer;
exit status 0 when every check passes, 1 when one fails. See workbench.ms.parity."""


def add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="MindSpore vs PyTorch: operator and end-to-end parity",
                       description=_PARITY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small); default: %(default)s")
    p.add_argument("--router", default="softmax_topk",
                   help="softmax_topk, switch, sigmoid or uniform; default: %(default)s")
    p.add_argument("--dispatch", default="sorted", help="sorted or capacity; default: %(default)s")
    p.add_argument("--mode", default="pynative", help="how MindSpore runs: pynative or graph; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=2, help="sequences of the end-to-end batch; default: %(default)s")
    p.add_argument("--curve-steps", type=int, default=50,
                   help="training steps of the loss-curve comparison (0: skip it); default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs; default: %(default)s")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")


def add_bench(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("mindspore", help="training step time: MindSpore GRAPH and PyNative vs PyTorch eager",
                         description="Time the training step of a preset in MindSpore GRAPH mode, MindSpore "
                                     "PyNative and PyTorch eager, taking turns --steps steps at a time for "
                                     "--rounds rounds; report each median and the ratios to PyTorch "
                                     "(see workbench.ms.bench).",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model preset")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, per side (GRAPH compiles here)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of the sides taking turns")
    p.add_argument("--modes", default="graph,pynative", help="comma-separated MindSpore modes to time")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")


def run_parity(args: argparse.Namespace) -> int:
    prog = "workbench parity"
    try:
        from workbench.ms.parity import MODES, parity_config, run_parity
    except ImportError as err:
        return fail(prog, err)
    try:
        if args.mode not in MODES:
            raise ValueError(f"--mode={args.mode!r} is invalid: allowed values are {', '.join(MODES)}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} is invalid: must be >= 1")
        if args.curve_steps < 0:
            raise ValueError(f"--curve-steps={args.curve_steps} is invalid: must be >= 0 (0 skips the curve)")
        cfg = parity_config(args.preset, router=args.router, dispatch=args.dispatch)
        from workbench.ms.model import check_supported

        check_supported(cfg)
    except ValueError as err:
        return fail(prog, err)
    print(f"parity: preset {args.preset}, router {args.router}, dispatch {args.dispatch}, MindSpore {args.mode}",
          flush=True)
    report = run_parity(cfg, mode=args.mode, seed=args.seed, batch_size=args.batch_size,
                        curve_steps=args.curve_steps)
    print(report.format())
    write_json(args.json, report.to_dict())
    return 0 if report.passed else 1


def run_bench(args: argparse.Namespace) -> int:
    prog = "workbench bench mindspore"
    try:
        from workbench.ms._import import require_mindspore
        from workbench.ms.bench import format_mindspore_bench, run_mindspore_bench

        require_mindspore()
    except ImportError as err:
        return fail(prog, err)
    try:
        result = run_mindspore_bench(args.preset, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                                     rounds=args.rounds, modes=tuple(m for m in args.modes.split(",") if m),
                                     log=lambda line: print(line, flush=True))
    except ValueError as err:
        return fail(prog, err)
    print(format_mindspore_bench(result))
    write_json(args.json, result)
    return 0
