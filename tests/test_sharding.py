"""Single-process checks of the pieces the sharded (FSDP2 / DCP) path relies on."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from lightning_grokfast import attach_grokfast
from lightning_grokfast.core.state import ParamState


def test_the_state_initialising_step_of_get_optimizer_state_dict_does_not_run_the_filter():
    """torch's ``_init_optim_state`` runs ``optimizer.step()`` with zero gradients and lr 0 on an empty optimizer."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, "ema+ma", model=model, window_size=3)
    get_optimizer_state_dict(model, optimizer)
    assert handle.filter.steps == 0
    assert all(not s.ema_started and s.ma_count == 0 for s in handle.filter.states.values())

    model(torch.randn(4, 3)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert handle.filter.steps == 1
    for name, state in handle.filter.states.items():  # the EMA starts at the first real gradient
        assert torch.equal(state.ema, grads[name])


def test_a_real_first_step_with_lr_zero_is_filtered():
    """A warm-up schedule may start at lr 0: real (non-zero) gradients are filtered as usual."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    handle = attach_grokfast(optimizer, "ema", model=model)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert handle.filter.steps == 1


def test_filter_state_round_trips_through_get_and_set_optimizer_state_dict():
    """The ``set_optimizer_state_dict`` path also hands our keys to the filter before torch casts them."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, "ema+ma", model=model, window_size=2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, dtype=torch.bfloat16)).float().sum().backward()
        optimizer.step()
    saved = get_optimizer_state_dict(model, optimizer)
    expected = {n: ParamState.from_dict(s.to_dict()).to_dict() for n, s in handle.filter.states.items()}  # copies
    handle.filter.reset()
    set_optimizer_state_dict(model, optimizer, saved)
    for name, entry in expected.items():
        state = handle.filter.states[name].to_dict()
        assert state["ema"].dtype == torch.float32  # not cast to the bfloat16 parameter
        for key, value in entry.items():
            assert torch.equal(state[key], value) if isinstance(value, torch.Tensor) else state[key] == value
    assert all("grokfast_ema" not in s for s in optimizer.state.values())  # the live optimizer state stays clean
