"""Argument checks shared by every entry point: each names the argument and the allowed range.

Pure Python and torch; no Lightning import. Every public constructor validates with these, so a bad value fails
at construction time with the same message wherever it is passed.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def check_bool(value: Any, name: str) -> bool:
    """Accept only a real ``bool`` (``"false"`` is not false).

    Raises:
        ValueError: If ``value`` is not ``True`` or ``False``.

    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """A finite real number in the given range, as ``float``.

    Raises:
        ValueError: If ``value`` is not a finite real number in the range (the message states the range).

    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)
        if low is not None:
            ok = x >= low if low_inclusive else x > low
        if ok and high is not None:
            ok = x <= high if high_inclusive else x < high
    if not ok:
        raise ValueError(
            f"`{name}` must be {_describe_range(low, high, low_inclusive, high_inclusive)}, got {value!r}."
        )
    return float(value)


def _describe_range(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"a finite number {'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"a finite number {'<=' if high_inclusive else '<'} {high:g}"
    return "a finite number"


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """Validate an EMA momentum in ``[0, 1)``.

    Raises:
        ValueError: If ``alpha`` is not a finite number in ``[0, 1)``.

    """
    return check_number(alpha, name, low=0.0, high=1.0, high_inclusive=False)


def check_lamb(lamb: Any, name: str = "lamb") -> float:
    """Validate an amplification factor ``>= 0``.

    Raises:
        ValueError: If ``lamb`` is negative or not finite.

    """
    return check_number(lamb, name, low=0.0)


def check_int(value: Any, name: str, *, low: int = 0) -> int:
    """An ``int`` (not a bool) ``>= low``.

    Raises:
        ValueError: If ``value`` is not an integer ``>= low``.

    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices``.

    Raises:
        ValueError: If ``value`` is not one of ``choices``.

    """
    allowed = tuple(choices)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
    return value


def as_pattern_list(value: Any, name: str) -> list[re.Pattern[str]]:
    """Compile one regular expression (a string) or a list/tuple of them; ``None`` is an empty list.

    A string is *one* pattern, never split into characters.

    Raises:
        ValueError: If ``value`` is neither a string nor a list/tuple of strings, or a pattern does not compile.

    """
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(
            f"`{name}` must be a regular expression (str) or a list of them, got {value!r} ({type(value).__name__})."
        )
    return [compile_pattern(p, name) for p in value]


def compile_pattern(pattern: str, name: str) -> re.Pattern[str]:
    """Compile a regular expression, naming the argument on failure.

    Raises:
        ValueError: If ``pattern`` is not a valid regular expression.

    """
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"`{name}` holds an invalid regular expression {pattern!r}: {err}") from err


def as_pattern_factors(value: Any, name: str) -> list[tuple[re.Pattern[str], float]]:
    """``{pattern: factor >= 0}`` as a list of compiled ``(pattern, factor)``; ``None`` is an empty list.

    Raises:
        ValueError: If ``value`` is not a mapping of strings to finite numbers ``>= 0``.

    """
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise ValueError(
            f"`{name}` must be a mapping of name pattern to factor, e.g. {{'embed': 0.5}}, got {value!r}"
            f" ({type(value).__name__})."
        )
    return [(compile_pattern(p, name), check_lamb(f, f"{name}[{p!r}]")) for p, f in value.items()]


def as_float_list(value: Any, name: str, *, low: float | None = None, high: float | None = None) -> list[float]:
    """One number or a list/tuple of numbers in a range, as a list of floats.

    Raises:
        ValueError: If ``value`` is not a number or a list/tuple of numbers in the range.

    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a number or a list of numbers, got {value!r} ({type(value).__name__}).")
    return [check_number(v, f"{name}[{i}]", low=low, high=high) for i, v in enumerate(value)]


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or fail naming the extra that installs it.

    Raises:
        ImportError: If ``module`` is not installed (the message says ``pip install "lightning-grokfast[extra]"``).

    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f'{what} needs `{module.split(".")[0]}`: install it with `pip install "lightning-grokfast[{extra}]"`.'
        ) from err


def resolve_state_dtype(state_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"float32"``/``torch.float32``/``None`` into a floating dtype or ``None``.

    Raises:
        ValueError: If the name is not a floating point dtype.

    """
    dtype: Any
    if state_dtype is None or isinstance(state_dtype, torch.dtype):
        dtype = state_dtype
    elif isinstance(state_dtype, str) and isinstance(
        getattr(torch, state_dtype.removeprefix("torch."), None), torch.dtype
    ):
        dtype = getattr(torch, state_dtype.removeprefix("torch."))
    else:
        raise ValueError(
            f"`state_dtype` must be a floating dtype name such as 'float32', or None, got {state_dtype!r}."
        )
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"`state_dtype` must be a floating point dtype, got {dtype}.")
    return dtype
