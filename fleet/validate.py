"""One way to check a value at a boundary (a config file, a request, a record off the wire), with the error
every boundary gives: it names the field, what was expected and what came.

    from fleet.validate import check_int, check_number, is_int

    check_int("FleetConfig.replicas", value, lo=1)            # ValueError: FleetConfig.replicas: expected an
                                                              #   int >= 1, got 0
    check_number("ServeConfig.gather_s", v, lo=0, hi=1.0)     # finite by default
    check_int("steps", v, lo=1, error=CorrectionError)        # any ValueError subclass

A bool is never an int or a number here (Python's `True == 1` is a classic way for a config typo to pass).
Every check returns the value, converted where that is lossless (a number becomes a float).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, NoReturn


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fail(field: str, expected: str, got: Any, error: type[Exception] = ValueError) -> NoReturn:
    raise error(f"{field}: expected {expected}, got {got!r}")


def _bounds(kind: str, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in [{lo}, {hi}]"
    if lo is not None:
        return f"{kind} >= {lo}"
    if hi is not None:
        return f"{kind} <= {hi}"
    return kind


def check_int(
    field: str,
    value: Any,
    lo: int | None = None,
    hi: int | None = None,
    *,
    expected: str | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """`value` as an int within [lo, hi] (either bound optional), else `error` naming the field."""
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(field, expected or _bounds("an int", lo, hi), value, error)
    return value


def check_number(
    field: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    finite: bool = True,
    expected: str | None = None,
    error: type[Exception] = ValueError,
) -> float:
    """`value` as a float within [lo, hi] (either bound optional; finite unless told), else `error`."""
    ok = is_number(value) and (not finite or math.isfinite(value))
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        fail(field, expected or _bounds("a finite number" if finite else "a number", lo, hi), value, error)
    return float(value)


def check_bool(field: str, value: Any, *, error: type[Exception] = ValueError) -> bool:
    if not isinstance(value, bool):
        fail(field, "true or false", value, error)
    return value


def check_str(
    field: str, value: Any, *, nonempty: bool = True, expected: str | None = None, error: type[Exception] = ValueError
) -> str:
    if not isinstance(value, str) or (nonempty and not value.strip()):
        fail(field, expected or ("a non-empty string" if nonempty else "a string"), value, error)
    return value


def check_choice(field: str, value: Any, choices: Collection[str], *, error: type[Exception] = ValueError) -> str:
    if not isinstance(value, str) or value not in choices:
        fail(field, "one of " + ", ".join(repr(c) for c in choices), value, error)
    return value
