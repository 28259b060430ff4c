"""The ``workbench`` command: ``train``, ``show``, ``sweep``, ``bench layer``, ``bench train``,
``bench expert-parallel``, ``bench throughput``, ``bench model``, ``bench devices``,
``bench mindspore``, ``parity``.

Every fault is one line on stderr, never a traceback: a bad flag or config value, unusable
data, a device this torch cannot use, a run directory that cannot be written, a checkpoint
that cannot be written or read. Exit status: 0 done, 1 training diverged (or parity failed),
2 any other fault, 130 interrupted (Ctrl-C).

The package: ``common`` (``fail``, ``write_json``, the flags generated from config dataclasses),
one module per family of subcommands (``train``: train, show, sweep; ``bench``; ``ms``: parity,
bench mindspore), and this module, which builds the parser from them and runs the command. The
subcommand modules import ``common`` and library code, never each other or this module.
"""

from __future__ import annotations

import argparse
import sys

from workbench.cli.common import EXIT_INTERRUPTED, Parser, one_line_warnings

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets ``run``, the function that runs it."""
    # imported here, not with this module: they import torch, the slow part of the start (see main)
    from workbench.cli import bench, ms, train

    parser = Parser(prog="workbench", description="A research workbench for Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train.add_parsers(sub)
    bench_commands = bench.add_parsers(sub)
    ms.add_bench(bench_commands)  # bench mindspore
    ms.add_parity(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch and the subcommands: a second or two
    except KeyboardInterrupt:  # Ctrl-C while starting: one line, not the traceback of an import
        print("workbench: interrupted while starting", file=sys.stderr)
        return EXIT_INTERRUPTED
    args = parser.parse_args(argv)
    with one_line_warnings():
        try:
            return args.run(args)
        except KeyboardInterrupt:  # Ctrl-C outside training (building the corpus, a benchmark)
            print(f"workbench {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
