"""Grokfast for PyTorch Lightning: amplify slow gradients so models grok sooner."""

from lightning_grokfast.callback import GrokfastCallback
from lightning_grokfast.config import FilterConfig
from lightning_grokfast.dashboard import GrokkingDashboardCallback
from lightning_grokfast.detector import GrokkingDetectorCallback, GrokkingStateMachine
from lightning_grokfast.filters import GradientFilter, ParamState, StepInfo
from lightning_grokfast.hook import GrokfastHandle, attach_grokfast

__all__ = [
    "FilterConfig",
    "GradientFilter",
    "GrokfastCallback",
    "GrokfastHandle",
    "GrokkingDashboardCallback",
    "GrokkingDetectorCallback",
    "GrokkingStateMachine",
    "ParamState",
    "StepInfo",
    "attach_grokfast",
]
__version__ = "0.1.0"
