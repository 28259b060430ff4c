"""The ``workbench`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workbench.runtime import tune_cpu_allocator


class _Parser(argparse.ArgumentParser):
    """Bad input: exit status 2 and one line naming the problem, no usage dump or traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    layer = which.add_parser("layer", help="MoE layer forward+backward vs a dense FFN and the loop reference",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from workbench.bench.layer import LayerBenchConfig

    defaults = LayerBenchConfig()
    layer.add_argument("--tokens", type=int, default=defaults.tokens)
    layer.add_argument("--d-model", type=int, default=defaults.d_model)
    layer.add_argument("--expert-hidden", type=int, default=defaults.expert_hidden)
    layer.add_argument("--num-experts", type=int, default=defaults.num_experts)
    layer.add_argument("--top-k", type=int, default=defaults.top_k)
    layer.add_argument("--dispatches", type=_dispatch_list, default=",".join(defaults.dispatches),
                       help="comma-separated dispatch names to time")
    layer.add_argument("--repeats", type=int, default=defaults.repeats)
    layer.add_argument("--warmup", type=int, default=defaults.warmup)
    layer.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"])
    layer.add_argument("--device", default=defaults.device)
    layer.add_argument("--json", type=Path, default=None, help="also write the result here")
    layer.add_argument("--no-allocator-tuning", action="store_true",
                       help="leave glibc's allocator as it is (see workbench.runtime)")


def _dispatch_list(text: str) -> tuple[str, ...]:
    from workbench.moe import DISPATCHES

    names = tuple(d for d in text.split(",") if d)
    unknown = [d for d in names if d not in DISPATCHES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dispatch {unknown or text!r}; allowed values are "
                                         f"{', '.join(DISPATCHES)}")
    return names


def _run_bench_layer(args: argparse.Namespace) -> int:
    from workbench.bench.layer import LayerBenchConfig, format_layer_bench, run_layer_bench

    if not args.no_allocator_tuning:
        tune_cpu_allocator()
    cfg = LayerBenchConfig(tokens=args.tokens, d_model=args.d_model, expert_hidden=args.expert_hidden,
                           num_experts=args.num_experts, top_k=args.top_k, dispatches=args.dispatches,
                           repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, device=args.device)
    result = run_layer_bench(cfg, progress=sys.stdout.isatty())
    print(format_layer_bench(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="A research workbench for Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.bench == "layer":
        return _run_bench_layer(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
