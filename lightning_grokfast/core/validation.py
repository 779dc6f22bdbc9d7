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
    """Accept only a real ``bool`` (the string ``"false"`` is not false).

    Args:
        value: the value given.
        name: the argument's name, for the error message.

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not ``True`` or ``False``.

    Example::

        >>> from lightning_grokfast.core.validation import check_bool
        >>> check_bool(True, "warmup")
        True
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

    Args:
        value: the value given.
        name: the argument's name, for the error message.
        low: the lower bound, or ``None``.
        high: the upper bound, or ``None``.
        low_inclusive: whether ``low`` itself is allowed.
        high_inclusive: whether ``high`` itself is allowed.

    Returns:
        ``value`` as a ``float``.

    Raises:
        ValueError: If ``value`` is not a finite real number in the range (the message states the range).

    Example::

        >>> from lightning_grokfast.core.validation import check_number
        >>> check_number(2, "lamb", low=0)
        2.0
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

    Args:
        alpha: the value given.
        name: the argument's name, for the error message.

    Returns:
        ``alpha`` as a ``float``.

    Raises:
        ValueError: If ``alpha`` is not a finite number in ``[0, 1)``.

    Example::

        >>> from lightning_grokfast.core.validation import check_alpha
        >>> check_alpha(0.98)
        0.98
    """
    return check_number(alpha, name, low=0.0, high=1.0, high_inclusive=False)


def check_lamb(lamb: Any, name: str = "lamb") -> float:
    """Validate an amplification factor ``>= 0``.

    Args:
        lamb: the value given.
        name: the argument's name, for the error message.

    Returns:
        ``lamb`` as a ``float``.

    Raises:
        ValueError: If ``lamb`` is negative or not finite.

    Example::

        >>> from lightning_grokfast.core.validation import check_lamb
        >>> check_lamb(5)
        5.0
    """
    return check_number(lamb, name, low=0.0)


def check_int(value: Any, name: str, *, low: int = 0) -> int:
    """An ``int`` (not a bool) ``>= low``.

    Args:
        value: the value given.
        name: the argument's name, for the error message.
        low: the smallest value allowed.

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not an integer ``>= low``.

    Example::

        >>> from lightning_grokfast.core.validation import check_int
        >>> check_int(100, "window_size", low=1)
        100
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices``.

    Args:
        value: the value given.
        name: the argument's name, for the error message.
        choices: the values allowed.

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not one of ``choices``.

    Example::

        >>> from lightning_grokfast.core.validation import check_choice
        >>> check_choice("ma", "filter", ("ema", "ma"))
        'ma'
    """
    allowed = tuple(choices)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
    return value


def as_pattern_list(value: Any, name: str) -> list[re.Pattern[str]]:
    """Compile one regular expression (a string) or a list/tuple of them; ``None`` is an empty list.

    A string is *one* pattern, never split into characters.

    Args:
        value: ``None``, a pattern, or a list/tuple of patterns.
        name: the argument's name, for the error message.

    Returns:
        The compiled patterns.

    Raises:
        ValueError: If ``value`` is neither a string nor a list/tuple of strings, or a pattern does not compile.

    Example::

        >>> from lightning_grokfast.core.validation import as_pattern_list
        >>> [p.pattern for p in as_pattern_list("bias", "exclude")]
        ['bias']
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

    Args:
        pattern: the regular expression.
        name: the argument's name, for the error message.

    Returns:
        The compiled pattern.

    Raises:
        ValueError: If ``pattern`` is not a valid regular expression.

    Example::

        >>> from lightning_grokfast.core.validation import compile_pattern
        >>> compile_pattern("^head", "exclude").pattern
        '^head'
    """
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"`{name}` holds an invalid regular expression {pattern!r}: {err}") from err


def as_pattern_factors(value: Any, name: str) -> list[tuple[re.Pattern[str], float]]:
    """``{pattern: factor >= 0}`` as a list of compiled ``(pattern, factor)``; ``None`` is an empty list.

    Args:
        value: ``None`` or a mapping of regular expressions to factors.
        name: the argument's name, for the error message.

    Returns:
        The compiled patterns with their factors, in the mapping's order.

    Raises:
        ValueError: If ``value`` is not a mapping of strings to finite numbers ``>= 0``.

    Example::

        >>> from lightning_grokfast.core.validation import as_pattern_factors
        >>> [(p.pattern, f) for p, f in as_pattern_factors({"^head": 0.5}, "lamb_scale")]
        [('^head', 0.5)]
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

    Args:
        value: a number or a list/tuple of numbers.
        name: the argument's name, for the error message.
        low: the lower bound (inclusive), or ``None``.
        high: the upper bound (inclusive), or ``None``.

    Returns:
        The numbers as floats.

    Raises:
        ValueError: If ``value`` is not a number or a list/tuple of numbers in the range.

    Example::

        >>> from lightning_grokfast.core.validation import as_float_list
        >>> as_float_list(0.5, "marks", low=0, high=1)
        [0.5]
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a number or a list of numbers, got {value!r} ({type(value).__name__}).")
    return [check_number(v, f"{name}[{i}]", low=low, high=high) for i, v in enumerate(value)]


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or fail naming the extra that installs it.

    Args:
        module: the module to import.
        extra: the extra of lightning-grokfast that installs it.
        what: what needs it, for the error message.

    Returns:
        The imported module.

    Raises:
        ImportError: If ``module`` is not installed (the message says ``pip install "lightning-grokfast[extra]"``).

    Example::

        >>> from lightning_grokfast.core.validation import require
        >>> require("math", "tasks", "the digits task").sqrt(4.0)
        2.0
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

    Args:
        state_dtype: a dtype, its name, or ``None`` (keep the gradient's dtype).

    Returns:
        The dtype, or ``None``.

    Raises:
        ValueError: If the name is not a floating point dtype.

    Example::

        >>> from lightning_grokfast.core.validation import resolve_state_dtype
        >>> resolve_state_dtype("float32")
        torch.float32
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
