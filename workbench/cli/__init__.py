"""The ``workbench`` command: ``train``, ``show``, ``sweep``, ``bench layer``, ``bench train``,
``bench expert-parallel``, ``bench throughput``, ``bench model``, ``bench devices``,
``bench mindspore``, ``parity``, ``generate``, ``eval``, ``upcycle``.

Every fault is one line on stderr, never a traceback: a bad flag or config value, unusable
data, a device this torch cannot use, a run directory that cannot be written, a checkpoint
that cannot be written or read. Exit status: 0 done, 1 training diverged (or parity failed),
2 any other fault, 130 interrupted (Ctrl-C); ``train`` also ends on SIGTERM (143) and SIGHUP
(129) as on Ctrl-C. A closed stdout (``workbench show RUN | head -1``) is a normal end.

The package: ``common`` (``fail``, ``write_json``, the flags generated from config dataclasses),
one module per family of subcommands (``train``: train, show, sweep; ``bench``; ``ms``: parity,
bench mindspore; ``generate``: generate, eval; ``upcycle``), and this module, which builds the parser from them
and runs the command. The subcommand modules import ``common`` and library code, never each
other or this module.
"""

from __future__ import annotations

import argparse
import sys

from workbench.cli.common import EXIT_INTERRUPTED, Parser, one_line_warnings, stdout_closed, stdout_gone

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets ``run``, the function that runs it."""
    # imported here, not with this module: they import torch, the slow part of the start (see main)
    from workbench.cli import bench, generate, ms, train, upcycle

    parser = Parser(prog="workbench", description="A research workbench for Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train.add_parsers(sub)
    bench_commands = bench.add_parsers(sub)
    ms.add_bench(bench_commands)  # bench mindspore
    ms.add_parity(sub)
    generate.add_parsers(sub)  # generate, eval
    upcycle.add_parsers(sub)  # upcycle
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
            status = args.run(args)
        except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM, SIGHUP in train) outside training
            by = getattr(err, "signal_name", None)
            print(f"workbench {args.command}: interrupted" + (f" by {by}" if by else ""), file=sys.stderr)
            return getattr(err, "exit_status", EXIT_INTERRUPTED)
        except BrokenPipeError:
            if not stdout_gone():  # another pipe (a worker's): not ours to call normal
                raise
            stdout_closed()  # `workbench show RUN | head -1`: the reader has what it wanted
            return 0
        try:
            sys.stdout.flush()  # a closed pipe shows here rather than in the interpreter's flush at exit
        except BrokenPipeError:
            stdout_closed()
        return status
