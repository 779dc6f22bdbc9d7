"""Grokfast for PyTorch Lightning: amplify slow gradients so models grok sooner."""

from lightning_grokfast.callback import GrokfastCallback
from lightning_grokfast.dashboard import GrokkingDashboardCallback
from lightning_grokfast.detector import GrokkingDetectorCallback, GrokkingStateMachine
from lightning_grokfast.filters import GradientFilter, StepInfo

__all__ = [
    "GradientFilter",
    "GrokfastCallback",
    "GrokkingDashboardCallback",
    "GrokkingDetectorCallback",
    "GrokkingStateMachine",
    "StepInfo",
]
__version__ = "0.1.0"
