"""What the two benchmark scripts share: the environment record and a quiet Lightning."""

from __future__ import annotations

import logging
import platform
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import lightning.pytorch as pl
import torch


def environment(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on: versions, platform, threads, device (and the anchors' versions)."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for package in ("grokfast-pytorch", "grokadamw"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def quiet_lightning() -> None:
    """Keep Lightning's per-fit banner lines and known harmless warnings out of the report."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
