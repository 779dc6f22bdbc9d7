"""``state_dtype="bfloat16"``: half the filter memory, the same filter within a stated tolerance, no drift."""

from __future__ import annotations

import pytest
import torch

from lightning_grokfast import GradientFilter

SHAPES = [(64, 32), (32,), (16, 8, 4)]
NAMES = [f"p{i}" for i in range(len(SHAPES))]


def _grads(generator: torch.Generator, slow: list[torch.Tensor]) -> list[torch.Tensor]:
    """A slow component plus noise ten times larger: what the filter has to dig out."""
    return [s + torch.randn(s.shape, generator=generator) for s in slow]


def _run(filt: GradientFilter, steps: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    slow = [0.1 * torch.randn(s, generator=generator) for s in SHAPES]
    out: list[torch.Tensor] = []
    for _ in range(steps):
        out = _grads(generator, slow)
        filt.step(NAMES, out)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    ("kwargs", "state_bytes_per_param"),
    [
        ({"filter": "ema"}, 2),
        ({"filter": "ma", "window_size": 10}, 2 * 10 + 4),  # bfloat16 window, float32 running sum
        ({"filter": "ema+ma", "window_size": 10}, 2 + 2 * 10 + 4),
    ],
)
def test_bfloat16_state_of_float32_gradients_takes_two_bytes_per_value(kwargs, state_bytes_per_param):
    filt = GradientFilter(**kwargs, state_dtype="bfloat16")
    filt.step(NAMES, [torch.randn(s) for s in SHAPES])
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    assert filt.state_bytes() == state_bytes_per_param * numel
    assert all(t.dtype in (torch.bfloat16, torch.float32) for s in filt.states.values() for t in s.tensors())


def test_default_state_of_float32_gradients_stays_float32():
    filt = GradientFilter("ema")
    filt.step(NAMES, [torch.randn(s) for s in SHAPES])
    assert all(s.ema.dtype == torch.float32 for s in filt.states.values())


def test_bfloat16_ema_equals_float32_ema_within_two_percent_over_1000_steps():
    # EMA alpha 0.98: each step rounds the state to bfloat16 (relative 2**-9); the error stays bounded, as the
    # rounding of old steps decays with alpha. Stated tolerance: 2 % of the state's norm, 1 % of the filtered gradient.
    full, half = (
        GradientFilter("ema", alpha=0.98, lamb=2.0),
        GradientFilter("ema", alpha=0.98, lamb=2.0, state_dtype="bfloat16"),
    )
    out_full, out_half = _run(full, 1000), _run(half, 1000)
    for name in NAMES:
        assert _relative(half.states[name].ema, full.states[name].ema) < 0.02
    for a, b in zip(out_half, out_full):
        assert _relative(a, b) < 0.01


def test_bfloat16_ma_equals_float32_ma_within_half_a_percent_over_1000_steps():
    # Each windowed gradient is rounded once (relative 2**-9); the mean of 50 of them is off by far less.
    kwargs = {"filter": "ma", "window_size": 50, "lamb": 5.0}
    full, half = GradientFilter(**kwargs), GradientFilter(**kwargs, state_dtype="bfloat16")
    out_full, out_half = _run(full, 1000), _run(half, 1000)
    for name in NAMES:
        assert _relative(half.states[name].ma_sum, full.states[name].ma_sum) < 0.005
    for a, b in zip(out_half, out_full):
        assert _relative(a, b) < 0.005


def test_bfloat16_window_running_sum_equals_a_fresh_sum_exactly():
    # Gradients k/1024 + u with |u| < 2**-13 and 64 <= |k| < 128 round to k/1024 in bfloat16; sums of such values
    # are exact in float32. So a running sum that adds what the window keeps equals a fresh sum bit for bit,
    # and one that added the unrounded gradient would be off by the accumulated u.
    generator = torch.Generator().manual_seed(0)
    filt = GradientFilter("ma", window_size=30, lamb=1.0, state_dtype="bfloat16", resum_every=10**9)
    for _ in range(1000):
        grads = []
        for shape in SHAPES:
            k = torch.randint(64, 128, shape, generator=generator) * (
                2 * torch.randint(0, 2, shape, generator=generator) - 1
            )
            u = (torch.rand(shape, generator=generator) - 0.5) * 2**-13
            grads.append(k / 1024 + u)
        filt.step(NAMES, grads)
    for name in NAMES:
        state = filt.states[name]
        assert state.ma_updates == 1000
        assert torch.equal(state.ma_sum, state.ma_history.float().sum(dim=0))


def test_bfloat16_window_running_sum_drifts_by_float32_rounding_only():
    # Gaussian gradients: the running sum's only error is its own float32 rounding, a few units in the last place
    # of the sum's scale after 1000 updates (never re-summed here), far below one bfloat16 rounding (2**-9).
    filt = GradientFilter("ma", window_size=30, lamb=1.0, state_dtype="bfloat16", resum_every=10**9)
    _run(filt, 1000)
    for name in NAMES:
        state = filt.states[name]
        fresh = state.ma_history.double().sum(dim=0)
        scale = state.ma_history.float().abs().sum(dim=0).max()
        ulp = float(torch.finfo(torch.float32).eps * scale)
        assert float((state.ma_sum.double() - fresh).abs().max()) <= 16 * ulp


def test_float32_state_from_a_checkpoint_continues_in_bfloat16():
    full = GradientFilter("ema+ma", window_size=4)
    _run(full, 6)
    half = GradientFilter("ema+ma", window_size=4, state_dtype="bfloat16")
    half.load_state_dict(full.state_dict())
    generator = torch.Generator().manual_seed(1)
    half.step(NAMES, [torch.randn(s, generator=generator) for s in SHAPES])
    for name in NAMES:
        state = half.states[name]
        assert state.ema.dtype == state.ma_history.dtype == torch.bfloat16
        # re-anchored on the rounded window, then one running update (float32 rounding only)
        torch.testing.assert_close(state.ma_sum, state.ma_history.float().sum(dim=0), atol=1e-6, rtol=1e-6)
