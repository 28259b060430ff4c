"""What every subcommand of ``workbench`` shares: the one-line error (``fail``), the JSON writer
(``write_json``), the parser class, and the flags generated from a config dataclass
(``add_config_flags``, read back with ``given``).

The subcommand modules import this module and library code, never each other, so the CLI has no
import cycle (``tests/test_cli_imports.py`` checks it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import select
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_DIVERGED, EXIT_FAULT, EXIT_INTERRUPTED = 1, 2, 130


class Parser(argparse.ArgumentParser):
    """Bad input: exit status 2 and one line naming the problem, no usage dump or traceback."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(EXIT_FAULT, f"{self.prog}: error: {message}\n")


def one_line(message: Any) -> str:
    return " ".join(str(message).split())


def fail(prog: str, message: Any) -> int:
    """Print ``<prog>: error: <message>`` as one line and return the bad-input exit status; every
    subcommand (training, bench, parity) reports refused input this way."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_FAULT


def usage_error(prog: str, message: str) -> typing.NoReturn:
    """``fail`` and exit: for refusals deep inside a command."""
    raise SystemExit(fail(prog, message))


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as one ``workbench: warning: ...`` line each (not file:line plus source)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(
            f"workbench: warning: {one_line(message)}", file=sys.stderr)
        yield


def stdout_gone() -> bool:
    """stdout is a pipe whose reader has gone (``workbench show RUN | head -1``)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # no fd (captured), no poll
        return False


def stdout_closed() -> None:
    """stdout's reader has gone: send what is still to be printed to /dev/null, so neither a later
    print nor the interpreter's flush at exit fails. A closed pipe is a normal end, not an error."""
    with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def say(*args: Any, **kwargs: Any) -> None:
    """``print`` for a command whose work goes on when stdout's reader goes away
    (``workbench train ... | head -1`` still trains and writes its summary)."""
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        stdout_closed()


def write_json(path: Path | None, data: Any) -> None:
    """Write ``data`` as JSON (NaN refused) when ``path`` is given, saying where; a path that cannot
    be written is one line and exit status 2."""
    if path is None:
        return
    from workbench.train.rundir import json_safe

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    except OSError as err:
        usage_error("workbench", f"could not write {path}: {err.strerror or err}")
    print(f"wrote {path}")


def add_json_flag(parser: argparse.ArgumentParser, help: str = "also write the result here") -> None:
    """``--json PATH``: where ``write_json`` writes the command's result."""
    parser.add_argument("--json", type=Path, default=None, help=help)


def add_allocator_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-allocator-tuning``: a benchmark that tunes glibc's allocator first can be told not to."""
    parser.add_argument("--no-allocator-tuning", action="store_true",
                        help="leave glibc's allocator as it is (see workbench.runtime)")


# --- config dataclasses as flags --------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: the flag's help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+):[^#\n]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for line in source.splitlines() if (m := pattern.match(line))}


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(text)


_parse_bool.__name__ = "bool"  # argparse names the type in its error message: invalid bool value


def _named(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    parse.__name__ = name  # argparse names the type in its error message
    return parse


def _parse_list(kind: type) -> Callable[[str], tuple]:
    """Comma-separated values; empty items are dropped, so "" is the empty tuple."""
    return _named(lambda text: tuple(kind(t) for t in text.split(",") if t), kind.__name__)


def _parse_optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return _named(lambda text: None if text.lower() == "none" else parse(text), parse.__name__)


def _parser_of(kind: Any) -> tuple[Callable[[str], Any], str] | None:
    """How to parse a value of the field type ``kind``, and its metavar word; None: no flag can."""
    if kind in (int, float, str):
        return kind, kind.__name__.upper()
    if kind is bool:
        return _parse_bool, "true|false"
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] == (...,):
        item = typing.get_args(kind)[0]
        if item in (int, float, str):
            return _parse_list(item), f"{item.__name__.upper()},..."
    return None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None, title: str | None = None, *,
                     skip: Sequence[str] = (), help: Mapping[str, str] | None = None,
                     allowed: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """One flag per field of the dataclass ``cls`` (but ``skip``); returns the fields that became flags.

    - name: ``--field-name``, or ``--<metadata["flag"]>``; the dest is the field's name;
    - type: ``bool`` is ``--x / --no-x``; ``int``, ``float``, ``str``, ``Path``; ``tuple[str, ...]``
      (and of int or float) is comma-separated; ``X | None`` also takes ``none`` (but a path);
      any other type raises ``TypeError``, so a new field never silently misses its flag;
    - help: ``metadata["help"]``, else the field's trailing comment, else ``help[name]``, then the
      allowed values and ``(default: ...)`` taken from ``defaults`` (default: the field defaults);
    - allowed values, from the registry (a tuple, or a dict's keys) in the field's metadata:
      ``"choices"`` (a ``str`` field): the parser refuses any other value; ``"allowed"``, or the
      ``allowed`` argument (what a config's own validation allows): listed in the help, and the
      config (or the command) refuses any other value with its own message, naming the field.

    Defaults are ``argparse.SUPPRESS``: a flag not given is absent from the parsed arguments, so the
    config keeps its own default and the caller can tell a given value from a default (``given``).
    """
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
        inner = [a for a in typing.get_args(kind) if a is not type(None)][0] if optional else kind
        flag = f.metadata.get("flag", f.name).replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif inner is Path:  # any text is a path, "none" too
            kwargs.update(type=Path, metavar=flag.replace("-", "_").upper())
        elif (parsed := _parser_of(inner)) is not None:
            parse, word = parsed
            if optional:
                kwargs.update(type=_parse_optional(parse), metavar=f"{word}|none")
            else:  # as argparse names it: --tokens TOKENS
                kwargs.update(type=parse, metavar=flag.replace("-", "_").upper())
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: a field of type {kind} cannot be a flag")

        text = f.metadata.get("help") or comments.get(f.name) or (help or {}).get(f.name) or f.name.replace("_", " ")
        choices = tuple(f.metadata.get("choices", ()))
        listed = tuple(f.metadata.get("allowed", ())) or tuple((allowed or {}).get(f.name, ()))
        if choices:  # refused as it is parsed; argparse shows {a,b,c}
            if kind is not str:
                raise TypeError(f"{cls.__name__}.{f.name}: 'choices' is for a str field; list the names with 'allowed'")
            kwargs["choices"] = choices
            del kwargs["metavar"]
        elif listed:
            text = f"{text}; one of: {', '.join(listed)}"
        default = getattr(defaults, f.name) if defaults is not None else _default_of(f)
        kwargs["help"] = f"{text} (default: {_shown(default)})".replace("%", "%%")
        group.add_argument("--" + flag, **kwargs)
        names.append(f.name)
    return names


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` that were given as flags (``add_config_flags``), by name;
    ``cls(**given(args, cls))`` is the config the command line asks for."""
    values = vars(args)
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
