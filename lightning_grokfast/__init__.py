"""Grokfast for PyTorch Lightning: amplify slow gradients so models grok sooner."""

from lightning_grokfast.callback import GrokfastCallback
from lightning_grokfast.filters import GradientFilter, StepInfo

__all__ = ["GradientFilter", "GrokfastCallback", "StepInfo"]
__version__ = "0.1.0"
