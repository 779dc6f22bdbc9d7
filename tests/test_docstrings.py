"""Every public class and function of the API reference has a docstring with the sections the reference needs.

The reference site (``docs/reference/``) is generated from these docstrings by mkdocstrings (Google style), so a
missing section is a hole in the published reference. The rules, checked with ``inspect``:

* every public class, function and method has a docstring;
* a public function or class (its ``__init__``) with parameters has an ``Args:`` section naming each of them
  (a dataclass may name its fields under ``Attributes:``);
* a public function or method that returns something (its annotation is not ``None``) has ``Returns:``
  (properties excepted: their docstring is the description of the value);
* a public function, method or class whose own code raises has ``Raises:``;
* a public module-level class or function has an example (``Example:``/``Example::``/``Examples:``).

Methods that override a base class's method (Lightning hooks, ``state_dict``) are documented by the base class.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import textwrap
from collections.abc import Iterator
from dataclasses import is_dataclass
from typing import Any

import pytest

#: the modules of the API reference whose docstrings this test checks
MODULES = [
    "lightning_grokfast.core.ops",
    "lightning_grokfast.core.state",
    "lightning_grokfast.core.config",
    "lightning_grokfast.core.validation",
    "lightning_grokfast.core.filters",
    "lightning_grokfast.core.groups",
    "lightning_grokfast.core.optim_state",
    "lightning_grokfast.core.sharding",
    "lightning_grokfast.core.amp",
    "lightning_grokfast.callbacks.grokfast",
    "lightning_grokfast.callbacks.detector",
    "lightning_grokfast.callbacks.phases",
    "lightning_grokfast.callbacks.tracking",
    "lightning_grokfast.callbacks.dashboard",
    "lightning_grokfast.callbacks.utils",
    "lightning_grokfast.integrations.functional",
    "lightning_grokfast.cli",
    "lightning_grokfast.cli.fit",
    "lightning_grokfast.cli.configs",
    "lightning_grokfast.tasks.base",
    "lightning_grokfast.tasks.modular",
    "lightning_grokfast.tasks.parity",
    "lightning_grokfast.tasks.digits",
    "lightning_grokfast.tasks.mlp",
    "lightning_grokfast.tasks.losses",
    "lightning_grokfast.tasks.permutations",
    "lightning_grokfast.tasks.mnist_1d",
    "lightning_grokfast.tasks.regression",
    "lightning_grokfast.core.binding",
    "lightning_grokfast.core.metrics",
    "lightning_grokfast.integrations.hook",
    "lightning_grokfast.integrations.hf",
    "lightning_grokfast.cli.tune",
    "lightning_grokfast.cli.tune_space",
    "lightning_grokfast.cli.tune_trial",
    "lightning_grokfast.cli.tune_report",
    "lightning_grokfast.compat",
]
SKIPPED: list[str] = []

EXAMPLE = re.compile(r"^\s*Examples?::?\s*$", re.MULTILINE)


def _section(doc: str, name: str) -> str | None:
    """The body of the Google-style section ``name`` (``Args``, ...), or None."""
    match = re.search(rf"^{name}:\s*$(.*?)(?=^\S|\Z)", doc, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def _public_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == module.__name__
        ]
    return [
        n
        for n in names
        if (inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n)))
        and getattr(module, n).__module__ == module.__name__  # re-exports are checked where they are defined
    ]


def _overrides(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:])


def _parameters(func: Any) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    skip = {"self", "cls"}
    return [p.name for p in signature.parameters.values() if p.name not in skip]


def _raises(func: Any) -> bool:
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return False
    body = source.split('"""', 2)[-1] if source.count('"""') >= 2 else source
    return re.search(r"^\s+raise [A-Z]\w*\(", body, re.MULTILINE) is not None


def _problems(obj: Any, qualname: str, top_level: bool, owner: type | None = None) -> Iterator[str]:
    doc = inspect.getdoc(obj) if owner is None else obj.__doc__ and inspect.cleandoc(obj.__doc__)
    if not doc:
        yield f"{qualname}: no docstring"
        return
    func = obj.__init__ if inspect.isclass(obj) else obj
    parameters = [] if inspect.isclass(obj) and "__init__" not in vars(obj) else _parameters(func)
    parameters = [p for p in parameters if p not in ("args", "kwargs")] or (
        ["*"] if any(p in ("args", "kwargs") for p in _parameters(func)) and not inspect.isclass(obj) else []
    )
    args = _section(doc, "Args") or (_section(doc, "Attributes") if is_dataclass(obj) else None)
    if parameters and parameters != ["*"]:
        if args is None:
            yield f"{qualname}: no Args section"
        else:
            missing = [p for p in parameters if not re.search(rf"^\s*\\?\**{p}\b", args, re.MULTILINE)]
            if missing:
                yield f"{qualname}: Args does not name {missing}"
    if not inspect.isclass(obj):
        returns = inspect.signature(obj).return_annotation
        if returns not in (None, "None", inspect.Signature.empty) and _section(doc, "Returns") is None:
            yield f"{qualname}: no Returns section"
    if _raises(func) and _section(doc, "Raises") is None:
        yield f"{qualname}: raises but has no Raises section"
    if top_level and not EXAMPLE.search(doc):
        yield f"{qualname}: no Example"


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(cls).items():
        if name.startswith("_") or _overrides(cls, name):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            yield name, member.__func__
        elif inspect.isfunction(member):
            yield name, member


def problems_of(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    found: list[str] = []
    for name in _public_names(module):
        obj = getattr(module, name)
        found += _problems(obj, f"{module_name}.{name}", top_level=True)
        if inspect.isclass(obj):
            for member_name, member in _members(obj):
                found += _problems(member, f"{module_name}.{name}.{member_name}", top_level=False, owner=obj)
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_public_api_docstrings_have_args_returns_raises_and_example(module_name: str) -> None:
    pytest.importorskip("jsonargparse") if module_name.startswith("lightning_grokfast.cli") else None
    assert problems_of(module_name) == []


@pytest.mark.parametrize("module_name", MODULES)
def test_doctest_examples_in_docstrings_run(module_name: str) -> None:
    pytest.importorskip("jsonargparse") if module_name.startswith("lightning_grokfast.cli") else None
    module = importlib.import_module(module_name)
    failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert failed == 0
