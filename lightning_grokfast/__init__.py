"""Grokfast for PyTorch Lightning: amplify slow gradients so models grok sooner.

The public names are imported lazily: ``from lightning_grokfast.filters import GradientFilter`` (or
``lightning_grokfast.hook``, ``.functional``) loads torch alone, not Lightning, matplotlib or the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "FilterConfig": "lightning_grokfast.config",
    "GradientFilter": "lightning_grokfast.filters",
    "ParamState": "lightning_grokfast.state",
    "StepInfo": "lightning_grokfast.state",
    "GrokfastHandle": "lightning_grokfast.hook",
    "attach_grokfast": "lightning_grokfast.hook",
    "GrokfastCallback": "lightning_grokfast.callback",
    "GrokkingDashboardCallback": "lightning_grokfast.dashboard",
    "GrokkingDetectorCallback": "lightning_grokfast.detector",
    "GrokkingStateMachine": "lightning_grokfast.detector",
}

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
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from lightning_grokfast.callback import GrokfastCallback
    from lightning_grokfast.config import FilterConfig
    from lightning_grokfast.dashboard import GrokkingDashboardCallback
    from lightning_grokfast.detector import GrokkingDetectorCallback, GrokkingStateMachine
    from lightning_grokfast.filters import GradientFilter
    from lightning_grokfast.hook import GrokfastHandle, attach_grokfast
    from lightning_grokfast.state import ParamState, StepInfo


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_grokfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
