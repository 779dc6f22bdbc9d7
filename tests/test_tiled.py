"""The tiled CPU path (update and amplification block by block) gives bitwise the result of the foreach path."""

from __future__ import annotations

import pytest
import torch

from lightning_grokfast import GradientFilter
from lightning_grokfast.core import ops

SHAPES = [(40, 30), (7,), (3, 50), (200,), (64,)]  # larger and smaller than the blocks of 64 elements


def tensors(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    made = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    made.append(torch.randn(50, 40, generator=generator).to(dtype).t())  # large but not contiguous: kept whole
    return made


def clones(values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in values]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_tiled_ema_step_equals_the_two_foreach_calls_bitwise(state_dtype: torch.dtype) -> None:
    grads, ema = tensors(0), tensors(1, state_dtype)
    ema = [e.t().contiguous().t() if not g.is_contiguous() else e for e, g in zip(ema, grads)]
    ref_grads, ref_ema = clones(grads), clones(ema)
    src = ref_grads if state_dtype == torch.float32 else [g.to(state_dtype) for g in ref_grads]
    ops.ema_update_(ref_ema, src, 0.02)
    ops.add_scaled_(ref_grads, ref_ema, 2.0)
    ops.ema_amplify_tiled_(ema, grads, 0.02, 2.0, block=64)
    for got, want in zip(ema + grads, ref_ema + ref_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("window_dtype", [torch.float32, torch.bfloat16])
def test_tiled_ma_step_equals_the_four_foreach_calls_bitwise(window_dtype: torch.dtype) -> None:
    grads, sums = tensors(0), tensors(1)
    slots = [s.to(window_dtype) for s in tensors(2)]
    slots = [s.t().contiguous().t() if not g.is_contiguous() else s for s, g in zip(slots, grads)]
    ref = clones(grads), clones(sums), clones(slots)
    ops.ma_update_(ref[1], ref[2], ref[0])
    ops.add_scaled_(ref[0], ref[1], 0.05)
    ops.ma_amplify_tiled_(sums, slots, grads, 0.05, block=64)
    for got, want in zip(grads + sums + slots, ref[0] + ref[1] + ref[2]):
        assert torch.equal(got, want)


def run(filt: GradientFilter, steps: int = 40, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    names = [f"p{i}" for i in range(len(SHAPES) + 1)]
    out = []
    for step in range(steps):
        grads = tensors(100 + step, dtype)
        if step == 17:
            grads[2][0, 0] = float("nan")  # a skipped step
        filt.step(names, grads)
        out.append(grads)
    return out


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])  # bfloat16: float32 state by default
@pytest.mark.parametrize(
    "settings",
    [
        {"filter": "ema", "alpha": 0.9, "lamb": 2.0},
        {"filter": "ema", "alpha": 0.9, "lamb": 2.0, "state_dtype": "bfloat16"},
        {"filter": "ma", "window_size": 5, "lamb": 3.0, "resum_every": 7},
        {"filter": "ma", "window_size": 5, "lamb": 3.0, "warmup": False, "filter_type": "sum"},
        {"filter": "ma", "window_size": 5, "lamb": 3.0, "state_dtype": "bfloat16"},
    ],
)
def test_a_filter_on_a_tiled_group_gives_bitwise_the_foreach_result(
    settings: dict, grad_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = run(GradientFilter(**settings), dtype=grad_dtype)
    monkeypatch.setattr(ops, "TILE_MIN_BYTES", 0)  # every CPU group tiled
    monkeypatch.setattr(ops, "TILE_ELEMENTS", 64)
    calls = []
    for name in ("ema_amplify_tiled_", "ma_amplify_tiled_"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    filt = GradientFilter(**settings)
    got = run(filt, dtype=grad_dtype)
    assert len(calls) >= 25  # the tiled path ran (not on the first steps, the skipped one, or re-sums)
    for step, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
    assert filt.skipped_steps == 1


def test_small_and_accelerator_groups_are_not_tiled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(ops, "ema_amplify_tiled_", lambda *a, **k: calls.append(1))
    run(GradientFilter("ema", alpha=0.9, lamb=2.0), steps=3)  # 30 KB of gradients: below ops.TILE_MIN_BYTES
    assert not calls


def test_tiling_leaves_normalize_the_guard_and_ema_plus_ma_on_the_foreach_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "TILE_MIN_BYTES", 0)
    calls = []
    for name in ("ema_amplify_tiled_", "ma_amplify_tiled_"):
        monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(1))
    for settings in (
        {"filter": "ema", "normalize": True},
        {"filter": "ema", "max_amplified_ratio": 2.0},
        {"filter": "ema+ma", "window_size": 3},
    ):
        run(GradientFilter(**settings), steps=6)
    assert not calls
