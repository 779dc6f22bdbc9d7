"""Deprecated alias of :mod:`lightning_grokfast.callbacks.grokfast` (this path is removed in 0.4)."""

from typing import TYPE_CHECKING

from lightning_grokfast.compat import alias_module

if TYPE_CHECKING:
    from lightning_grokfast.callbacks.grokfast import *  # noqa: F403

alias_module(__name__, "lightning_grokfast.callbacks.grokfast")
