"""lightning_grokfast.integrations.functional: the paper's two functions, same contract, on the shared filter core."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.reference import ReferenceEMA, ReferenceMA
from lightning_grokfast.integrations.functional import FilterState, gradfilter_ema, gradfilter_ma


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def backward(model: nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def run(function, reference, steps: int = 12, **kwargs) -> None:
    model, ref_model = make_model(), make_model()
    grads = None
    for step in range(steps):
        backward(model, step)
        backward(ref_model, step)
        grads = function(model, grads=grads, **kwargs)
        expected = reference({n: p.grad for n, p in ref_model.named_parameters()})
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], msg=f"{name} step {step}")
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):  # same SGD step on both
            p.data.sub_(0.1 * p.grad)
            q.data.sub_(0.1 * expected[name])


def test_gradfilter_ema_matches_the_published_algorithm():
    run(gradfilter_ema, ReferenceEMA(0.9, 2.0), alpha=0.9, lamb=2.0)


@pytest.mark.parametrize("filter_type", ["mean", "sum"])
@pytest.mark.parametrize("warmup", [True, False])
def test_gradfilter_ma_matches_the_published_algorithm(filter_type, warmup):
    run(
        gradfilter_ma,
        ReferenceMA(5, 1.5, warmup=warmup, filter_type=filter_type),
        window_size=5,
        lamb=1.5,
        filter_type=filter_type,
        warmup=warmup,
    )


def test_defaults_are_the_published_ones():
    import inspect

    ema = inspect.signature(gradfilter_ema).parameters
    ma = inspect.signature(gradfilter_ma).parameters
    assert [(n, p.default) for n, p in ema.items()][1:] == [("grads", None), ("alpha", 0.98), ("lamb", 2.0)]
    assert [(n, p.default) for n, p in ma.items()][1:] == [
        ("grads", None),
        ("window_size", 100),
        ("lamb", 5.0),
        ("filter_type", "mean"),
        ("warmup", True),
        ("trigger", False),
    ]


def test_trigger_records_the_window_but_adds_nothing():
    model = make_model()
    grads = None
    for step in range(4):
        backward(model, step)
        raw = [p.grad.clone() for p in model.parameters()]
        grads = gradfilter_ma(model, grads=grads, window_size=2, trigger=True)
        assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), raw))
    assert isinstance(grads, FilterState)
    assert set(grads) == {n for n, _ in model.named_parameters()}  # name -> window mean, as a dict


def test_a_non_finite_gradient_does_not_poison_the_returned_state():
    model = make_model()
    grads = None
    for step in range(3):
        backward(model, step)
        if step == 1:
            model[0].bias.grad[0] = float("inf")
        grads = gradfilter_ema(model, grads=grads)
    assert all(torch.isfinite(v).all() for v in grads.values())
    assert grads.filter.skipped_steps == 1


def test_changing_the_window_of_a_running_state_is_refused():
    model = make_model()
    backward(model, 0)
    grads = gradfilter_ma(model, window_size=3)
    with pytest.raises(ValueError, match="start again with grads=None"):
        gradfilter_ma(model, grads=grads, window_size=4)
    with pytest.raises(ValueError, match="`grads` must be None or the value gradfilter_ema returned"):
        gradfilter_ema(model, grads={"0.weight": torch.zeros(8, 4)})
