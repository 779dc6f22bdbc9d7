"""Short path of :mod:`lightning_grokfast.integrations.hf`: ``from lightning_grokfast.hf import
GrokfastTrainerCallback``.

Needs the ``[hf]`` extra (``transformers``); importing it without raises an ``ImportError`` that names the extra.
"""

from lightning_grokfast.integrations.hf import GrokfastTrainerCallback

__all__ = ["GrokfastTrainerCallback"]
