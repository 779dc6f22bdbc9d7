"""Grokfast for PyTorch Lightning: amplify slow gradients so models grok sooner.

The public names are imported lazily: ``from lightning_grokfast.core.filters import GradientFilter`` (or
``lightning_grokfast.integrations.hook``, ``.functional``) loads torch alone, not Lightning, matplotlib or the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "FilterConfig": "lightning_grokfast.core.config",
    "GradientFilter": "lightning_grokfast.core.filters",
    "ParamState": "lightning_grokfast.core.state",
    "StepInfo": "lightning_grokfast.core.state",
    "GrokfastHandle": "lightning_grokfast.integrations.hook",
    "attach_grokfast": "lightning_grokfast.integrations.hook",
    "GrokfastCallback": "lightning_grokfast.callbacks.grokfast",
    "GrokfastTrainerCallback": "lightning_grokfast.integrations.hf",
    "GrokkingDashboardCallback": "lightning_grokfast.callbacks.dashboard",
    "GrokkingDetectorCallback": "lightning_grokfast.callbacks.detector",
    "GrokkingStateMachine": "lightning_grokfast.callbacks.detector",
    "auto_grokfast": "lightning_grokfast.callbacks.auto",
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
    "auto_grokfast",
]
#: importable by name but left out of ``from lightning_grokfast import *``, which would need the ``[hf]`` extra
_OPTIONAL = {"GrokfastTrainerCallback"}
assert sorted(__all__) == sorted(set(_EXPORTS) - _OPTIONAL)

if TYPE_CHECKING:
    from lightning_grokfast.callbacks.auto import auto_grokfast
    from lightning_grokfast.callbacks.dashboard import GrokkingDashboardCallback
    from lightning_grokfast.callbacks.detector import GrokkingDetectorCallback, GrokkingStateMachine
    from lightning_grokfast.callbacks.grokfast import GrokfastCallback
    from lightning_grokfast.core.config import FilterConfig
    from lightning_grokfast.core.filters import GradientFilter
    from lightning_grokfast.core.state import ParamState, StepInfo
    from lightning_grokfast.integrations.hf import GrokfastTrainerCallback as GrokfastTrainerCallback
    from lightning_grokfast.integrations.hook import GrokfastHandle, attach_grokfast


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_grokfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
