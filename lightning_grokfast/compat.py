"""Module paths of 0.2 kept as deprecated aliases of their new homes (removed in 0.4)."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

__all__ = ["alias_module"]


def alias_module(old: str, new: str) -> ModuleType:
    """Make the module ``old`` an alias of the module ``new``, with a :class:`DeprecationWarning`.

    The alias is the very module object (``sys.modules[old] is sys.modules[new]``), so classes, private helpers and
    ``isinstance`` checks behave as with the new path.

    Args:
        old: the deprecated dotted module path (the shim's ``__name__``).
        new: the dotted module path that replaces it.

    Returns:
        The module ``new``.

    Example::

        # lightning_grokfast/filters.py
        from lightning_grokfast.compat import alias_module

        alias_module(__name__, "lightning_grokfast.core.filters")

    """
    warnings.warn(
        f"`{old}` moved to `{new}`: import from the new path (the old one is removed in lightning-grokfast 0.4).",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
