"""The pure-PyTorch gradient filters, against the straightforward references in tests/reference.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.reference import ReferenceEMA, ReferenceMA
from lightning_grokfast.core.filters import GradientFilter

SHAPES = {"layer.weight": (6, 5), "layer.bias": (6,), "head.weight": (3, 6)}


def random_grads(generator: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in SHAPES.items()}


def run_against(filt: GradientFilter, reference, steps: int, seed: int = 0, atol: float = 1e-5) -> None:
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        # a drifting mean, so the slow component is not just noise around zero
        grads = {n: g + 0.01 * step for n, g in random_grads(generator).items()}
        expected = reference({n: g.clone() for n, g in grads.items()})
        filt.step(list(grads), list(grads.values()))
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], atol=atol, rtol=1e-5, msg=f"{name} step {step}")


def make(filter: str, **kwargs) -> GradientFilter:
    return GradientFilter(filter, **kwargs)


def snapshot(filt: GradientFilter) -> dict:
    """A deep copy of the filter's state (``state_dict`` returns live tensors, as an optimizer's does)."""
    return copy.deepcopy(filt.state_dict()["params"])


class CountHostReads(TorchDispatchMode):
    """Counts reads of a tensor value on the host (``.item()``/``bool(t)`` dispatch ``_local_scalar_dense``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_local_scalar_dense" in str(func):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_ema_matches_reference_and_starts_at_first_gradient():
    run_against(make("ema", alpha=0.9, lamb=2.0), ReferenceEMA(0.9, 2.0), steps=60)


@pytest.mark.parametrize("filter_type", ["mean", "sum"])
@pytest.mark.parametrize("warmup", [True, False])
def test_ma_matches_resumming_reference_over_ten_windows(filter_type, warmup):
    window = 7
    filt = make("ma", window_size=window, lamb=5.0, warmup=warmup, filter_type=filter_type)
    run_against(filt, ReferenceMA(window, 5.0, warmup, filter_type), steps=10 * window + 3, atol=1e-4)


def test_ma_running_sum_stays_within_float32_tolerance_of_resumming_over_long_run():
    window = 50
    filt = GradientFilter("ma", window_size=window, lamb=1.0, resum_every=10**9)  # never re-anchored
    run_against(filt, ReferenceMA(window, 1.0), steps=12 * window, atol=1e-4)


def test_ma_resum_reanchors_the_running_sum_exactly():
    window = 4
    filt = GradientFilter("ma", window_size=window, lamb=1.0, resum_every=8, warmup=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(16):
        grads = random_grads(generator, scale=1e3)
        filt.step(list(grads), list(grads.values()))
    state = filt.state_dict()["params"]["layer.weight"]
    assert torch.equal(state["ma_sum"], state["ma_history"].sum(0))


def test_ema_plus_ma_adds_both_slow_terms_from_the_raw_gradient():
    filt = GradientFilter("ema+ma", alpha=0.8, lamb=2.0, window_size=3, ma_lamb=5.0, warmup=True)
    ema, ma = ReferenceEMA(0.8, 2.0), ReferenceMA(3, 5.0, warmup=True)
    generator = torch.Generator().manual_seed(2)
    for _ in range(12):
        grads = random_grads(generator)
        raw = {n: g.clone() for n, g in grads.items()}
        with_ema, with_ma = ema(dict(raw)), ma(dict(raw))
        filt.step(list(grads), list(grads.values()))
        for name in grads:
            expected = raw[name] + (with_ema[name] - raw[name]) + (with_ma[name] - raw[name])
            torch.testing.assert_close(grads[name], expected, atol=1e-5, rtol=1e-5)


def test_ma_work_per_step_does_not_depend_on_window_size():
    """O(1) per step: the same tensor operations run for a window of 10 and of 1000."""

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = {}
    for window in (10, 1000):
        filt = GradientFilter("ma", window_size=window, lamb=5.0, warmup=False)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):  # past the first step, which allocates the window
            grads = random_grads(generator)
            filt.step(list(grads), list(grads.values()))
        grads = random_grads(generator)
        with CountOps() as mode:
            filt.step(list(grads), list(grads.values()))
        counts[window] = sorted(mode.ops)
    assert counts[10] == counts[1000]


@pytest.mark.parametrize("kind", ["ema", "ma", "ema+ma"])
def test_finite_check_reads_one_flag_per_step_on_the_host_and_nothing_else(kind):
    """One behaviour on every device: the step reads its all-finite flag once (free under AMP, where the scaler
    reads the same verdict anyway), also when norms are logged and when a step is skipped."""
    filt = make(kind, window_size=3, warmup=False, max_amplified_ratio=10.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        grads = random_grads(generator)
        if step == 3:
            grads["layer.bias"][0] = float("inf")
        with CountHostReads() as mode:
            filt.step(list(grads), list(grads.values()), compute_norms=True)
        assert mode.reads == 1, step
    assert filt.skipped_steps == 1


@pytest.mark.parametrize("kind", ["ema", "ma", "ema+ma"])
def test_without_finite_check_the_step_never_reads_a_tensor_on_the_host(kind):
    filt = make(kind, window_size=3, warmup=False, check_finite=False, orthogonal=True, max_amplified_ratio=10.0)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator) for shape in SHAPES.values()]
    for _ in range(4):
        grads = random_grads(generator)
        with CountHostReads() as mode:
            filt.step(list(grads), list(grads.values()), params=params, compute_norms=True)
        assert mode.reads == 0


@pytest.mark.parametrize("kind", ["ema", "ma", "ema+ma"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_leaves_state_exactly_unchanged(kind, bad):
    filt = make(kind, window_size=3, warmup=False)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = random_grads(generator)
        filt.step(list(grads), list(grads.values()))
    before = snapshot(filt)
    grads = random_grads(generator)
    grads["head.weight"][1, 2] = bad
    info = filt.step(list(grads), list(grads.values()))
    after = snapshot(filt)
    assert not bool(info.finite)
    assert filt.total_skipped_steps == 1
    for name, entry in before.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after[name][key], value), (name, key)
                assert torch.isfinite(after[name][key]).all()


def test_skipped_step_does_not_advance_the_moving_average_window():
    filt = GradientFilter("ma", window_size=3, lamb=1.0, warmup=True)
    reference = ReferenceMA(3, 1.0, warmup=True)
    generator = torch.Generator().manual_seed(4)
    for step in range(9):
        grads = random_grads(generator)
        if step == 4:
            grads["layer.bias"][0] = float("nan")
            filt.step(list(grads), list(grads.values()))
            continue
        expected = reference({n: g.clone() for n, g in grads.items()})
        filt.step(list(grads), list(grads.values()))
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name])


def test_non_finite_first_gradient_does_not_start_the_ema():
    filt = GradientFilter("ema", alpha=0.9, lamb=1.0)
    grads = {"w": torch.tensor([float("nan"), 1.0])}
    filt.step(["w"], [grads["w"]])
    assert "w" in filt.state_names()  # allocated, but not started
    good = torch.tensor([2.0, 4.0])
    filt.step(["w"], [good])
    assert torch.equal(filt.state_dict()["params"]["w"]["ema"], torch.tensor([2.0, 4.0]))


def test_given_found_inf_verdict_is_used_instead_of_checking():
    filt = GradientFilter("ema", alpha=0.5, lamb=1.0)
    grads = [torch.ones(3)]
    filt.step(["w"], grads, found_inf=torch.tensor(1.0))
    assert filt.skipped_steps == 1
    assert torch.equal(grads[0], torch.ones(3))  # untouched
    filt.step(["w"], grads, found_inf=torch.tensor(0.0))
    assert torch.equal(grads[0], torch.full((3,), 2.0))


def test_amplify_false_updates_state_without_touching_gradients():
    filt = GradientFilter("ema", alpha=0.5, lamb=3.0)
    grad = torch.ones(4)
    info = filt.step(["w"], [grad], amplify=False)
    assert not info.amplified
    assert torch.equal(grad, torch.ones(4))
    assert torch.equal(filt.state_dict()["params"]["w"]["ema"], torch.ones(4))


@pytest.mark.parametrize("kind", ["ema", "ma", "ema+ma"])
def test_normalize_divides_amplified_gradient_by_one_plus_lamb(kind):
    plain = GradientFilter(kind, alpha=0.7, lamb=2.0, window_size=2, ma_lamb=3.0, warmup=False)
    normalized = GradientFilter(kind, alpha=0.7, lamb=2.0, window_size=2, ma_lamb=3.0, warmup=False, normalize=True)
    denominator = {"ema": 3.0, "ma": 3.0, "ema+ma": 6.0}[kind]
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):
        grads = random_grads(generator)
        a = {n: g.clone() for n, g in grads.items()}
        plain.step(list(grads), list(grads.values()))
        normalized.step(list(a), list(a.values()))
        for name in grads:
            torch.testing.assert_close(a[name], grads[name] / denominator)


def test_low_precision_gradients_keep_float32_state_unless_asked_otherwise():
    grad = torch.randn(8).to(torch.bfloat16)
    upcast = GradientFilter("ema", alpha=0.9, lamb=1.0)
    upcast.step(["w"], [grad.clone()])
    assert upcast.state_dict()["params"]["w"]["ema"].dtype == torch.float32
    native = GradientFilter("ema", alpha=0.9, lamb=1.0, state_dtype=None)
    native.step(["w"], [grad.clone()])
    assert native.state_dict()["params"]["w"]["ema"].dtype == torch.bfloat16


def test_low_precision_gradient_is_amplified_from_float32_state():
    filt = GradientFilter("ema", alpha=0.5, lamb=1.0)
    first = torch.full((4,), 1.0, dtype=torch.float16)
    filt.step(["w"], [first])
    second = torch.full((4,), 3.0, dtype=torch.float16)
    filt.step(["w"], [second])
    assert second.dtype == torch.float16
    torch.testing.assert_close(second, torch.full((4,), 5.0, dtype=torch.float16))  # 3 + 1 * (0.5 * 1 + 0.5 * 3)


def test_lamb_scale_multiplies_amplification_of_matching_names():
    filt = GradientFilter("ema", alpha=0.0, lamb=2.0)
    filt.set_lamb_scales({"b": 0.5})
    a, b = torch.ones(2), torch.ones(2)
    filt.step(["a", "b"], [a, b])
    assert torch.equal(a, torch.full((2,), 3.0))
    assert torch.equal(b, torch.full((2,), 2.0))


def test_name_that_appears_later_starts_its_own_ema():
    filt = GradientFilter("ema", alpha=0.5, lamb=1.0)
    filt.step(["a"], [torch.ones(2)])
    filt.step(["a"], [torch.ones(2)])
    late = torch.full((2,), 4.0)
    filt.step(["a", "late"], [torch.ones(2), late])
    assert torch.equal(filt.state_dict()["params"]["late"]["ema"], torch.full((2,), 4.0))
    assert torch.equal(late, torch.full((2,), 8.0))


def test_missing_gradient_leaves_that_names_state_untouched():
    filt = GradientFilter("ma", window_size=2, lamb=1.0, warmup=False)
    filt.step(["a", "b"], [torch.ones(1), torch.ones(1)])
    filt.step(["a"], [torch.full((1,), 3.0)])
    state = filt.state_dict()["params"]
    assert state["b"]["ma_count"] == 1 and state["a"]["ma_count"] == 2
    b = torch.full((1,), 5.0)
    filt.step(["a", "b"], [torch.ones(1), b])
    assert torch.equal(b, torch.full((1,), 8.0))  # 5 + mean(1, 5)


@pytest.mark.parametrize("kind", ["ema", "ma", "ema+ma"])
def test_state_dict_round_trips_through_weights_only_load(kind):
    filt = GradientFilter(kind, window_size=3)
    generator = torch.Generator().manual_seed(6)
    for _ in range(4):
        grads = random_grads(generator)
        filt.step(list(grads), list(grads.values()))
    buffer = io.BytesIO()
    torch.save(filt.state_dict(), buffer)
    buffer.seek(0)
    restored = GradientFilter(kind, window_size=3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    grads = random_grads(generator)
    copy = {n: g.clone() for n, g in grads.items()}
    filt.step(list(grads), list(grads.values()))
    restored.step(list(copy), list(copy.values()))
    for name in grads:
        assert torch.equal(grads[name], copy[name])


def test_loading_state_of_another_filter_kind_is_refused():
    filt = GradientFilter("ema")
    filt.step(["w"], [torch.ones(1)])
    with pytest.raises(ValueError, match="filter='ema'"):
        GradientFilter("ma").load_state_dict(filt.state_dict())


def test_state_of_a_different_shape_is_refused_with_the_name():
    filt = GradientFilter("ema")
    filt.step(["w"], [torch.ones(3)])
    other = GradientFilter("ema")
    other.load_state_dict(filt.state_dict())
    with pytest.raises(ValueError, match="'w' has shape"):
        other.step(["w"], [torch.ones(4)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filter": "median"}, "`filter` must be one of"),
        ({"alpha": 1.0}, r"`alpha` must be a number in \[0, 1\)"),
        ({"alpha": -0.1}, r"`alpha` must be a number in \[0, 1\)"),
        ({"lamb": -1.0}, "`lamb` must be a finite number >= 0"),
        ({"lamb": float("inf")}, "`lamb` must be a finite number >= 0"),
        ({"ma_lamb": -2.0}, "`ma_lamb` must be a finite number >= 0"),
        ({"window_size": 0}, "`window_size` must be an integer >= 1"),
        ({"window_size": 2.5}, "`window_size` must be an integer >= 1"),
        ({"filter_type": "max"}, "`filter_type` must be one of"),
        ({"state_dtype": "int8"}, "`state_dtype` must be a floating point dtype"),
        ({"state_dtype": "float33"}, "`state_dtype` must be a floating dtype name"),
        ({"resum_every": 0}, "`resum_every` must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientFilter(**kwargs)


def test_lamb_and_alpha_are_validated_when_changed():
    filt = GradientFilter("ema")
    filt.lamb = 4.0
    filt.alpha = 0.5
    assert (filt.lamb, filt.alpha) == (4.0, 0.5)
    with pytest.raises(ValueError, match="`lamb`"):
        filt.lamb = -1
    with pytest.raises(ValueError, match="`alpha`"):
        filt.alpha = 1.5


def test_norms_report_raw_gradient_and_slow_component():
    filt = GradientFilter("ema", alpha=0.0, lamb=1.0)  # alpha 0: the slow part is the gradient itself
    grad = torch.tensor([3.0, 4.0])
    info = filt.step(["w"], [grad], compute_norms=True)
    assert info.grad_norm.item() == pytest.approx(5.0)
    assert info.slow_norm.item() == pytest.approx(5.0)
    assert torch.equal(grad, torch.tensor([6.0, 8.0]))


def test_a_new_set_of_names_rebuilds_the_plan_in_work_independent_of_the_window():
    """Regrouping (a parameter gains or loses its gradient) costs O(parameters), not O(parameters x window)."""

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for window in (10, 1000):
        filt = GradientFilter("ma", window_size=window, lamb=5.0, warmup=False)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            grads = random_grads(generator)
            filt.step(list(grads), list(grads.values()))
        grads = random_grads(generator)
        del grads["layer.bias"]  # a different set of names: a new plan
        with CountOps() as mode:
            filt.step(list(grads), list(grads.values()))
        counts[window] = mode.count
    assert counts[10] == counts[1000]


def test_moving_average_sum_stays_float32_for_bfloat16_state():
    filt = GradientFilter("ma", window_size=50, lamb=1.0, state_dtype=None, resum_every=10**9)
    generator = torch.Generator().manual_seed(0)
    window = []
    for _ in range(400):
        grad = (torch.randn(64, generator=generator) + 1.0).to(torch.bfloat16)
        window = [*window, grad.float()][-50:]
        filt.step(["w"], [grad.clone()])
    state = filt.states["w"]
    assert state.ma_history.dtype == torch.bfloat16 and state.ma_sum.dtype == torch.float32
    exact = torch.stack(window).sum(0)
    assert float((state.ma_sum - exact).abs().max() / exact.abs().max()) < 1e-5
