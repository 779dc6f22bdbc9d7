"""Deprecated alias of :mod:`lightning_grokfast.core.filters` (this path is removed in 0.4)."""

from typing import TYPE_CHECKING

from lightning_grokfast.compat import alias_module

if TYPE_CHECKING:
    from lightning_grokfast.core.filters import *  # noqa: F403

alias_module(__name__, "lightning_grokfast.core.filters")
