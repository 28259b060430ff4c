"""The one way every config and registry refuses a value."""

from __future__ import annotations

import pytest

from workbench.validation import check, check_choice, check_int


def test_check_names_field_value_and_what_is_allowed():
    check(True, "lr", "must be > 0", -1)  # passes silently
    with pytest.raises(ValueError, match=r"^lr=-1 is invalid: must be > 0$"):
        check(False, "lr", "must be > 0", -1)


def test_check_choice_lists_the_choices_in_order():
    check_choice("router", "b", {"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"^router='z' is invalid: allowed values are a, b$"):
        check_choice("router", "z", {"a": 1, "b": 2})


@pytest.mark.parametrize("value", [0, -3, 2.0, 2.5, True, "4", None])
def test_check_int_refuses_non_integers_and_small_values(value):
    with pytest.raises(ValueError, match=r"is invalid: must be an integer >= 1$"):
        check_int("num_experts", value, 1)


def test_check_int_accepts_integers_at_or_above_the_minimum():
    check_int("num_experts", 1, 1)
    check_int("num_shared_experts", 0, 0)
