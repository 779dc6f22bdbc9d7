"""The search space of ``lightning-grokfast tune``: which settings a trial samples, and how they enter a fit config.

A search space maps names to what a trial does with them:

* a list: a categorical choice (``filter: [none, ema, ma, ema+ma]``);
* a mapping with ``low`` and ``high``: a number (``{low: 0.1, high: 10, log: true}``; ``type: int`` or
  ``step`` for integers and steps; ``log`` for a log-uniform draw);
* anything else: a fixed value, set in every trial and not sampled.

A plain name (``lamb``) is an argument of :class:`~lightning_grokfast.GrokfastCallback`, the config's ``grokfast``
group; a dotted name (``model.init_args.weight_decay``, ``trainer.gradient_clip_val``) is a path in the fit config.
The Grokfast names are conditional on the filter: ``alpha`` is sampled only for ``ema`` and ``ema+ma``,
``window_size``, ``warmup`` and ``filter_type`` only with a moving average, ``ma_lamb`` only for ``ema+ma``, and no
Grokfast name at all for ``none`` (the filter off: ``grokfast.enabled: false``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import optuna

__all__ = ["DEFAULT_SEARCH_SPACE", "FILTERS", "SearchSpace"]

#: The filter choices: ``none`` is the filter off (the baseline), the others are ``GrokfastCallback(filter=...)``.
FILTERS = ("none", "ema", "ma", "ema+ma")

#: The default search space. Ranges from the leaderboard (benchmarks/results/grokking_leaderboard.md) and the
#: paper: the EMA at alpha 0.98, lamb 2 is the best row on modular multiplication, the MA at window 100, lamb 5 the
#: best on sparse parity (where the EMA never reaches 95 %), and the paper's MNIST setting is alpha 0.8, lamb 0.1.
#: ``alpha`` from 0.8 to 0.995 spans EMA time constants ``1 / (1 - alpha)`` of 5 to 200 steps; ``window_size`` from
#: 10 to 200 the same time scales for the MA (the authors' rule: window ~ the hoped-for speed-up); ``lamb`` and
#: ``ma_lamb`` from 0.1 to 10 (log scale) cover the three published amplifications with room on either side.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "filter": list(FILTERS),
    "alpha": {"low": 0.8, "high": 0.995},
    "lamb": {"low": 0.1, "high": 10.0, "log": True},
    "window_size": {"low": 10, "high": 200, "log": True, "type": "int"},
    "ma_lamb": {"low": 0.1, "high": 10.0, "log": True},
}

#: Grokfast names and the filters they apply to (the other Grokfast names apply to every filter but ``none``).
_CONDITIONS: dict[str, tuple[str, ...]] = {
    "alpha": ("ema", "ema+ma"),
    "window_size": ("ma", "ema+ma"),
    "warmup": ("ma", "ema+ma"),
    "filter_type": ("ma", "ema+ma"),
    "ma_lamb": ("ema+ma",),
}
_RANGE_KEYS = {"low", "high", "log", "step", "type"}


class SearchSpace:
    """A validated search space (see the module documentation for its format).

    Args:
        spec: ``{name: list | {low, high, log?, step?, type?} | fixed value}``.

    Raises:
        ValueError: If a range is malformed (``low`` not below ``high``, ``log`` with ``low <= 0``, an unknown
            key), a list is empty, or ``filter`` names a filter outside :data:`FILTERS`.

    Example::

        space = SearchSpace({"filter": ["ema"], "lamb": {"low": 0.5, "high": 5.0, "log": True}})
        settings = space.sample(trial)  # {"filter": "ema", "lamb": 1.7}

    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"The search space must be a non-empty mapping of names to ranges, got {spec!r}.")
        self.spec: dict[str, Any] = {}
        for name, entry in spec.items():
            self.spec[str(name)] = _checked_entry(str(name), entry)
        filters = self.spec.get("filter", "ema")
        for choice in filters if isinstance(filters, list) else [filters]:
            if choice not in FILTERS:
                raise ValueError(f"Search space `filter`: {choice!r} is not one of {list(FILTERS)}.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """The search space in a YAML file (``--search-space FILE.yaml``).

        Args:
            path: the YAML file.

        Returns:
            The search space.

        Raises:
            ValueError: If the file does not hold a valid search space.

        """
        return cls(yaml.safe_load(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """The space as plain data (stored with the study, so every worker and ``--export`` see the same one).

        Returns:
            A deep copy of the specification.
        """
        return copy.deepcopy(self.spec)

    @property
    def is_grid(self) -> bool:
        """Whether every sampled name is a list (a grid that ``--sampler grid`` can enumerate)."""
        return all(not isinstance(entry, dict) for entry in self.spec.values())

    def grid(self) -> dict[str, list[Any]]:
        """The sampled names and their choices, for Optuna's ``GridSampler``.

        Returns:
            ``{name: choices}``.
        """
        return {name: entry for name, entry in self.spec.items() if isinstance(entry, list)}

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Draw one trial's settings.

        Args:
            trial: the Optuna trial that draws them.

        Returns:
            ``{name: value}`` for every name that applies to the drawn filter.
        """
        settings: dict[str, Any] = {}
        filter_entry = self.spec.get("filter", "ema")
        settings["filter"] = _suggest(trial, "filter", filter_entry)
        for name, entry in self.spec.items():
            if name != "filter" and self.applies(name, settings["filter"]):
                settings[name] = _suggest(trial, name, entry)
        return settings

    def settings_of(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A finished trial's settings.

        Args:
            params: the trial's sampled parameters.

        Returns:
            Its sampled ``params`` plus the fixed values of the space, for the names its filter uses.
        """
        settings = {"filter": params.get("filter", self.spec.get("filter", "ema"))}
        for name, entry in self.spec.items():
            if name == "filter" or not self.applies(name, settings["filter"]):
                continue
            settings[name] = params.get(name, entry)
        return settings

    @staticmethod
    def applies(name: str, filter: str) -> bool:
        """Whether a setting is used with a filter.

        Args:
            name: a setting (``alpha``, ``window_size``, ...) or a dotted config path (always used).
            filter: ``"none"``, ``"ema"``, ``"ma"`` or ``"ema+ma"``.

        Returns:
            ``True`` when ``filter`` reads ``name``.
        """
        if "." in name:
            return True
        return filter != "none" and filter in _CONDITIONS.get(name, FILTERS)


def apply_settings(config: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the fit ``config`` with a trial's ``settings`` in place.

    Grokfast names go into the ``grokfast`` group (``filter: none`` sets ``grokfast.enabled: false``, any other
    filter ``enabled: true``); dotted names are set at their path, creating missing mappings on the way.

    Args:
        config: a fit config as plain data (the parsed ``--config`` plus overrides).
        settings: ``{name: value}`` from :meth:`SearchSpace.sample` or :meth:`SearchSpace.settings_of`.

    Returns:
        The new config; ``config`` itself is left unchanged.

    Raises:
        ValueError: If a dotted path runs through a value that is not a mapping.

    """
    out = copy.deepcopy(config)
    grokfast = out.setdefault("grokfast", {})
    for name, value in settings.items():
        if "." in name:
            _set_path(out, name, value)
        elif name == "filter":
            grokfast["enabled"] = value != "none"
            if value != "none":
                grokfast["filter"] = value
        else:
            grokfast[name] = value
    return out


def describe(settings: Mapping[str, Any]) -> str:
    """``filter=ma window_size=87 lamb=4.2``: settings in one short line (floats to 3 significant digits)."""
    parts = []
    for name, value in settings.items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def _set_path(config: dict[str, Any], path: str, value: Any) -> None:
    node = config
    keys = path.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"Search space `{path}`: `{key}` is {child!r} in the config, not a mapping.")
        node = child
    node[keys[-1]] = value


def _checked_entry(name: str, entry: Any) -> Any:
    if isinstance(entry, list):
        if not entry:
            raise ValueError(f"Search space `{name}`: the list of choices is empty.")
        return list(entry)
    if not isinstance(entry, Mapping):
        return entry
    unknown = set(entry) - _RANGE_KEYS
    if unknown or not {"low", "high"} <= set(entry):
        raise ValueError(
            f"Search space `{name}`: a range needs `low` and `high` (optional `log`, `step`, `type`),"
            f" got {dict(entry)}."
        )
    low, high = entry["low"], entry["high"]
    kind = entry.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise ValueError(f"Search space `{name}`: `type` must be int or float, got {kind!r}.")
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and math.isfinite(low) and low < high):
        raise ValueError(f"Search space `{name}`: needs finite numbers low < high, got low={low!r} high={high!r}.")
    if entry.get("log") and low <= 0:
        raise ValueError(f"Search space `{name}`: a log range needs low > 0, got {low!r}.")
    if entry.get("log") and entry.get("step") is not None:
        raise ValueError(f"Search space `{name}`: `log` and `step` cannot be combined.")
    return {**dict(entry), "type": kind}


def _suggest(trial: optuna.Trial, name: str, entry: Any) -> Any:
    if isinstance(entry, list):
        return trial.suggest_categorical(name, entry)
    if not isinstance(entry, dict):
        return entry
    log = bool(entry.get("log", False))
    if entry["type"] == "int":
        step = int(entry.get("step") or 1)
        return trial.suggest_int(name, int(entry["low"]), int(entry["high"]), step=step, log=log)
    return trial.suggest_float(name, float(entry["low"]), float(entry["high"]), step=entry.get("step"), log=log)
