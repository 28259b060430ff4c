"""One way to refuse a bad value: ``ValueError`` naming the field, the value and what is allowed.

Every config (``MoEConfig``, ``ModelConfig``, ``TrainConfig``) and every registry lookup
(routers, dispatches, presets) goes through these two helpers, so the messages read alike and
the CLI can print them as its one-line error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check(ok: bool, field_name: str, allowed: str, value: Any) -> None:
    """Raise ``ValueError("field=value is invalid: allowed")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{field_name}={value!r} is invalid: {allowed}")


def check_choice(field_name: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` must be one of ``choices`` (a registry's keys, a tuple of names)."""
    choices = tuple(choices)
    check(value in choices, field_name, "allowed values are " + ", ".join(choices), value)


def check_int(field_name: str, value: Any, minimum: int) -> None:
    """An integer (not a bool, not a float that happens to be whole) of at least ``minimum``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    check(is_int and value >= minimum, field_name, f"must be an integer >= {minimum}", value)


def is_real(value: Any) -> bool:
    """An int or a float, not a bool (``True`` is an int to Python, never a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_real(field_name: str, value: Any, minimum: float, *, above: bool = False) -> None:
    """A finite number (not NaN, not infinite, not a bool) >= ``minimum`` (> it when ``above``).

    NaN compares false with everything and infinity passes ``>= 0``, so a plain comparison lets both
    through; a NaN or infinite learning rate or RoPE base then stops the run at its first step."""
    ok = is_real(value) and math.isfinite(value) and (value > minimum if above else value >= minimum)
    check(ok, field_name, f"must be a finite number {'>' if above else '>='} {minimum:g}", value)
