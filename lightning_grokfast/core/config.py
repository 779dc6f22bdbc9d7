"""The one validated configuration of a Grokfast filter, shared by every entry point.

:class:`FilterConfig` is owned by whoever the user talks to (``GrokfastCallback``, the handle of
``attach_grokfast``, a :class:`~lightning_grokfast.GradientFilter`); the filters of every optimizer read the
same object, so a change of ``lamb`` (e.g. a detector boost) reaches all of them at once. Pure Python and torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightning_grokfast.core.validation import (
    check_alpha,
    check_bool,
    check_choice,
    check_int,
    check_lamb,
    check_number,
    resolve_state_dtype,
)

FILTER_NAMES = ("ema", "ma", "ema+ma", "none")
MA_AGGREGATIONS = ("mean", "sum")

#: Settings that training itself may change (restored from a checkpoint); every other field is structure or
#: user configuration (the constructor wins on resume).
TUNABLE_FIELDS = ("alpha", "lamb", "ma_lamb")


@dataclasses.dataclass
class FilterConfig:
    r"""Validated settings of a Grokfast gradient filter.

    Every assignment is validated, also after construction (``config.lamb = -1`` raises).

    Args:
        filter: ``"ema"``, ``"ma"`` (windowed moving average), ``"ema+ma"`` (both, each from the raw gradient) or
            ``"none"`` (no slow component: only the gradient transforms, e.g. ``orthogonal``).
        alpha: EMA momentum in ``[0, 1)``: ``slow <- alpha * slow + (1 - alpha) * g``. Paper default 0.98.
        lamb: amplification ``>= 0`` of the EMA (``"ema"``, ``"ema+ma"``) or of the MA (``"ma"``).
        window_size: moving-average window, ``>= 1`` (paper: 100).
        ma_lamb: amplification ``>= 0`` of the MA term with ``filter="ema+ma"``.
        warmup: with a moving average, add nothing until the window is full (as the reference does).
        filter_type: ``"mean"`` or ``"sum"`` of the window.
        normalize: divide the amplified gradient by ``1 + lamb`` (``1 + lamb + ma_lamb`` for both), so the update
            keeps the size of the unfiltered one.
        state_dtype: dtype of the EMA and the MA window. It applies to float16/bfloat16 gradients (default
            float32: their state is kept in float32), and to every gradient when it is itself a 16-bit dtype:
            ``"bfloat16"`` halves the state of float32 models (2 bytes per parameter for the EMA, ``2 * window``
            for the window). Otherwise (``None``, or float32/float64 for wider gradients) the state has the
            gradient's dtype. The MA running sum stays float32 (float64 for float64 gradients) whatever this
            says, and adds exactly the rounded value the window keeps, so it does not drift.
        resum_every: recompute the MA running sum from its window every this many updates of a parameter, so
            rounding drift cannot build up (default ``10 * window_size``).
        check_finite: skip the whole step (state unchanged, nothing added) when a gradient is not finite. Costs one
            read pass over the gradients and, on accelerators outside AMP, one host read of a flag per step; under
            16-mixed the AMP scaler's own verdict is reused. ``False`` trusts the gradients.
        orthogonal: ⊥Grad (Prieto et al., ICLR 2025): before filtering, remove from each parameter's gradient its
            component along the parameter and rescale the result to the original gradient norm.
        max_amplified_ratio: divergence guard: when the added slow term's norm exceeds this multiple of the raw
            gradient's running norm, scale it down to that bound for the step (``None``: off).
        compile: with ``filter="ema"`` or ``"ma"``, run the state update and its amplification as one kernel per
            tensor made by ``torch.compile`` (the gradient and the state are read and written once; the finiteness
            check stays one foreach pass; MA warm-up steps and re-summations use the foreach path); not with
            ``normalize`` or ``max_amplified_ratio``. The first
            step compiles (seconds; on CPU up to a minute, and it needs a C++ compiler).

    Raises:
        ValueError: If an argument is out of its range (the message names it and the range), or ``compile=True``
            is combined with ``"ema+ma"``/``"none"``, ``normalize`` or ``max_amplified_ratio``.

    Example::

        config = FilterConfig("ema", alpha=0.98, lamb=2.0)
        config = FilterConfig.from_speedup(100, filter="ma")   # window_size=100

    """

    filter: str = "ema"
    alpha: float = 0.98
    lamb: float = 2.0
    window_size: int = 100
    ma_lamb: float = 5.0
    warmup: bool = True
    filter_type: str = "mean"
    normalize: bool = False
    state_dtype: str | torch.dtype | None = torch.float32
    resum_every: int | None = None
    check_finite: bool = True
    orthogonal: bool = False
    max_amplified_ratio: float | None = None
    compile: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        checker = _CHECKS.get(name)
        super().__setattr__(name, checker(value) if checker is not None else value)

    def __post_init__(self) -> None:
        if self.compile and (
            self.filter not in ("ema", "ma") or self.normalize or self.max_amplified_ratio is not None
        ):
            raise ValueError(
                "`compile=True` fuses the EMA or MA step: it needs filter='ema' or 'ma' without `normalize` or"
                f" `max_amplified_ratio` (got filter={self.filter!r}, normalize={self.normalize},"
                f" max_amplified_ratio={self.max_amplified_ratio})."
            )

    # ------------------------------------------------------------------ derived
    @property
    def uses_ema(self) -> bool:
        """Whether the filter keeps an EMA."""
        return self.filter in ("ema", "ema+ma")

    @property
    def uses_ma(self) -> bool:
        """Whether the filter keeps a moving-average window."""
        return self.filter in ("ma", "ema+ma")

    @property
    def resum_interval(self) -> int:
        """Updates between exact re-summations of the MA running sum."""
        return self.resum_every if self.resum_every is not None else 10 * self.window_size

    def amplifications(self, scale: float = 1.0) -> tuple[float, float]:
        """The (EMA, MA) multipliers of the slow terms, times ``scale``.

        Args:
            scale: a per-parameter factor (from ``lamb_scale``).

        Returns:
            ``(ema_coefficient, ma_coefficient)``; a term the filter does not keep has 0.
        """
        if self.filter == "ema":
            return self.lamb * scale, 0.0
        if self.filter == "ma":
            return 0.0, self.lamb * scale
        if self.filter == "ema+ma":
            return self.lamb * scale, self.ma_lamb * scale
        return 0.0, 0.0

    def tunables(self) -> dict[str, float]:
        """The settings training may change, as plain floats (what a checkpoint restores).

        Returns:
            ``{"alpha": ..., "lamb": ..., "ma_lamb": ...}``.
        """
        return {name: float(getattr(self, name)) for name in TUNABLE_FIELDS}

    def structure(self) -> dict[str, Any]:
        """The settings the saved state depends on (a checkpoint must match them).

        Returns:
            ``{"filter": ..., "window_size": ...}``.
        """
        return {"filter": self.filter, "window_size": self.window_size if self.uses_ma else None}

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python (``state_dtype`` as its name).

        Returns:
            ``{field: value}``; ``FilterConfig(**config.to_dict())`` rebuilds the config.
        """
        out = dataclasses.asdict(self)
        out["state_dtype"] = None if self.state_dtype is None else str(self.state_dtype).removeprefix("torch.")
        return out

    # ------------------------------------------------------------------ rules of thumb
    @staticmethod
    def speedup_settings(speedup: float, filter: str = "ema") -> dict[str, Any]:
        r"""The authors' rule of thumb for a target acceleration ``N``: ``window_size ~ N`` or ``alpha**N ~ 0.1``.

        ``N`` is how many times sooner generalization should come: the filter then averages gradients over about
        ``N`` steps (the MA window is ``N`` steps long; the EMA forgets 90% of a gradient in ``N`` steps).

        Args:
            speedup: the target acceleration ``N > 1``.
            filter: ``"ema"``, ``"ma"`` or ``"ema+ma"``.

        Returns:
            The filter arguments: ``{"filter", "alpha"}`` and/or ``{"window_size"}``.

        Raises:
            ValueError: If ``speedup`` is not a finite number > 1 or ``filter`` is not a filter with a slow term.

        """
        n = check_number(speedup, "speedup", low=1.0, low_inclusive=False)
        check_choice(filter, "filter", ("ema", "ma", "ema+ma"))
        settings: dict[str, Any] = {"filter": filter}
        if filter in ("ema", "ema+ma"):
            settings["alpha"] = 0.1 ** (1.0 / n)
        if filter in ("ma", "ema+ma"):
            settings["window_size"] = max(1, round(n))
        return settings

    @classmethod
    def from_speedup(cls, speedup: float, filter: str = "ema", **kwargs: Any) -> FilterConfig:
        """A config from :meth:`speedup_settings`, other fields from ``kwargs``.

        Args:
            speedup: the target acceleration ``N > 1``.
            filter: ``"ema"`` (sets ``alpha``), ``"ma"`` (sets ``window_size``) or ``"ema+ma"`` (both).
            **kwargs: the other fields.

        Returns:
            The config.

        Raises:
            ValueError: If an argument is out of its range.
        """
        return cls(**{**kwargs, **cls.speedup_settings(speedup, filter)})

    @classmethod
    def from_arguments(cls, filter: str = "ema", *, speedup: float | None = None, **fields: Any) -> FilterConfig:
        """The config of an entry point's arguments, ``speedup`` (when given) setting ``alpha``/``window_size``.

        Args:
            filter: ``"ema"``, ``"ma"``, ``"ema+ma"`` or ``"none"``.
            speedup: the authors' rule of thumb for a target acceleration ``N`` (see :meth:`speedup_settings`), or
                ``None``.
            **fields: the other fields, as the entry point received them.

        Returns:
            The config.

        Raises:
            ValueError: If ``speedup`` comes with a non-default ``alpha`` or ``window_size``, or an argument is out of
                its range.

        Example::

            FilterConfig.from_arguments("ma", speedup=50, lamb=5.0).window_size  # 50

        """
        if speedup is None:
            return cls(filter=filter, **fields)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if any(fields.get(name, defaults[name]) != defaults[name] for name in ("alpha", "window_size")):
            raise ValueError("Pass either `speedup` or `alpha`/`window_size`: `speedup` sets them by the rule.")
        return cls(**{**fields, **cls.speedup_settings(speedup, filter)})


def _check_optional(check: Any, name: str) -> Any:
    return lambda value: None if value is None else check(value, name)


_CHECKS: dict[str, Any] = {
    "filter": lambda v: check_choice(v, "filter", FILTER_NAMES),
    "alpha": check_alpha,
    "lamb": check_lamb,
    "window_size": lambda v: check_int(v, "window_size", low=1),
    "ma_lamb": lambda v: check_lamb(v, "ma_lamb"),
    "warmup": lambda v: check_bool(v, "warmup"),
    "filter_type": lambda v: check_choice(v, "filter_type", MA_AGGREGATIONS),
    "normalize": lambda v: check_bool(v, "normalize"),
    "state_dtype": resolve_state_dtype,
    "resum_every": _check_optional(lambda v, n: check_int(v, n, low=1), "resum_every"),
    "check_finite": lambda v: check_bool(v, "check_finite"),
    "orthogonal": lambda v: check_bool(v, "orthogonal"),
    "max_amplified_ratio": _check_optional(
        lambda v, n: check_number(v, n, low=0.0, low_inclusive=False), "max_amplified_ratio"
    ),
    "compile": lambda v: check_bool(v, "compile"),
}

assert set(_CHECKS) == {f.name for f in dataclasses.fields(FilterConfig)}


class TunableSettings:
    """``alpha``, ``lamb`` and ``ma_lamb`` as validated, live properties of an object's ``config``.

    Mixed into everything users hold (the filter, the callback, the handle of ``attach_grokfast``), so each reads and
    writes the one shared :class:`FilterConfig`.

    Example::

        >>> from lightning_grokfast import GradientFilter
        >>> filt = GradientFilter("ema", lamb=2.0)
        >>> filt.lamb = 4.0  # validated, and shared with filt.config
        >>> filt.config.lamb
        4.0
    """

    config: FilterConfig

    @property
    def alpha(self) -> float:
        """EMA momentum in ``[0, 1)``, settable between steps (e.g. by an adaptive-alpha schedule)."""
        return self.config.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.config.alpha = value

    @property
    def lamb(self) -> float:
        """Amplification of the EMA (or of the MA with ``filter="ma"``), settable between steps."""
        return self.config.lamb

    @lamb.setter
    def lamb(self, value: float) -> None:
        self.config.lamb = value

    @property
    def ma_lamb(self) -> float:
        """Amplification of the moving-average term with ``filter="ema+ma"``, settable between steps."""
        return self.config.ma_lamb

    @ma_lamb.setter
    def ma_lamb(self, value: float) -> None:
        self.config.ma_lamb = value
