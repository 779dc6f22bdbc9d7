"""The private torch/Lightning attributes the package reads, each wrapped in one place: these fail loudly when an
upgrade changes them, instead of the package silently falling back."""

from __future__ import annotations

import inspect

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI

from lightning_grokfast.callbacks.utils import is_logging_step
from lightning_grokfast.core.amp import scaler_found_inf
from tests.helpers import TinyModel, trainer


def test_grad_scaler_per_optimizer_states_hold_the_unscaled_verdict():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.unscale_(optimizer)
    state = scaler._per_optimizer_states[id(optimizer)]
    assert state["stage"].name == "UNSCALED"
    assert isinstance(state["found_inf_per_device"], dict)
    assert float(scaler_found_inf(scaler, optimizer)) == 1.0


def test_logger_connector_says_when_lightning_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    seen = []

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            assert isinstance(trainer._logger_connector.should_update_logs, bool)
            seen.append(is_logging_step(trainer))

    trainer(max_steps=4, log_every_n_steps=2, logger=CSVLogger(tmp_path), callbacks=[Record()]).fit(TinyModel())
    assert seen == [False, True, False, True]


def test_lightning_cli_internals_used_by_the_cli_exist():
    # lightning_grokfast.cli.fit calls these three LightningCLI methods (and only these private ones)
    assert list(inspect.signature(LightningCLI._get).parameters)[:3] == ["self", "config", "key"]
    assert "subcommand" in inspect.signature(LightningCLI._parser).parameters
    assert list(inspect.signature(LightningCLI._instantiate_trainer).parameters) == ["self", "config", "callbacks"]
