"""Beyond the paper: ⊥Grad, the divergence guard and tuning by target speed-up."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_grokfast import FilterConfig, GradientFilter, GrokfastCallback, attach_grokfast
from lightning_grokfast.core.ops import orthogonalize_
from tests.helpers import TinyModel, trainer


def direct_orthogonal(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The definition, one tensor at a time in float64."""
    g, w = grad.double().flatten(), param.double().flatten()
    u = g - (g @ w) / (w @ w) * w
    return (u * g.norm() / u.norm()).reshape(grad.shape).to(grad.dtype)


def test_orthogonal_gradient_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator) for shape in [(7, 5), (5,), (3, 7), (1,)]]
    grads = [torch.randn(p.shape, generator=generator) + 0.3 * p for p in params]
    expected = [direct_orthogonal(g, p) for g, p in zip(grads, params)]
    orthogonalize_(grads, params)
    for g, e, p in zip(grads, expected, params):
        if p.numel() == 1:  # a one-element gradient is parallel to its parameter: the definition gives 0/0
            assert torch.equal(g, torch.zeros_like(g))
            continue
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        if p.numel() > 1:
            assert abs(float(g.double().flatten() @ p.double().flatten())) < 1e-4 * float(g.norm() * p.norm())


def test_orthogonal_keeps_the_gradient_of_a_zero_parameter_and_zeroes_a_parallel_one():
    grads = [torch.ones(3), torch.tensor([2.0, 4.0])]
    orthogonalize_(grads, [torch.zeros(3), torch.tensor([1.0, 2.0])])
    assert torch.equal(grads[0], torch.ones(3))
    assert torch.equal(grads[1], torch.zeros(2))


def test_orthogonal_matches_pytorch_optimizer_orthograd():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")  # optional comparison: the `bench` extra
    torch.manual_seed(0)
    ours, theirs = nn.Linear(6, 4), nn.Linear(6, 4)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    attach_grokfast(opt_ours, filter="none", orthogonal=True)
    opt_theirs = pytorch_optimizer.OrthoGrad(torch.optim.SGD(theirs.parameters(), lr=0.1))
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_orthogonal_runs_before_the_filter_in_a_trainer():
    callback = GrokfastCallback(filter="ema", orthogonal=True, lamb=0.0)
    model = TinyModel()
    trainer(max_steps=3, callbacks=[callback]).fit(model)
    # the EMA is built from orthogonalized gradients: (nearly) orthogonal to the parameters they were taken at
    assert callback.filters[0].steps == 3


def explode(ratio: float | None, steps: int = 60) -> list[float]:
    """A toy problem where lamb=60 makes the filtered gradient's feedback loop blow up."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10))
    target = torch.randn(10)
    optimizer = torch.optim.SGD([w], lr=0.5)
    handle = attach_grokfast(optimizer, filter="ema", alpha=0.9, lamb=60.0, max_amplified_ratio=ratio)
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        ((w - target) ** 2).sum().backward()
        optimizer.step()
        norms.append(float(w.detach().norm()))
    assert handle.filter.steps == steps
    return norms


def test_divergence_guard_keeps_a_run_finite_that_diverges_without_it():
    unguarded = explode(None)
    guarded = explode(2.0)
    assert not math.isfinite(unguarded[-1]) or unguarded[-1] > 1e10
    assert all(math.isfinite(n) for n in guarded) and guarded[-1] < 100.0


def test_divergence_guard_reports_its_scale_and_leaves_small_terms_alone():
    filt = GradientFilter("ema", alpha=0.5, lamb=1.0, max_amplified_ratio=10.0)
    grad = [torch.ones(4)]
    info = filt.step(["w"], grad, compute_norms=True)
    assert float(info.guard_scale) == 1.0  # lamb * slow = 1 * |g|, well within 10 x |g|
    assert torch.equal(grad[0], torch.full((4,), 2.0))


def test_speedup_rule_of_thumb():
    config = FilterConfig.from_speedup(100, filter="ema+ma")
    assert config.alpha**100 == pytest.approx(0.1)
    assert config.window_size == 100
    callback = GrokfastCallback.from_speedup(50, filter="ma", lamb=5.0)
    assert (callback.config.window_size, callback.lamb) == (50, 5.0)
    assert GrokfastCallback(speedup=10).alpha == pytest.approx(0.1 ** (1 / 10))
    with pytest.raises(ValueError, match=r"`speedup` must be a finite number > 1"):
        GrokfastCallback(speedup=1)
    with pytest.raises(ValueError, match="Pass either `speedup` or `alpha`/`window_size`"):
        GrokfastCallback(speedup=10, alpha=0.5)


def test_every_option_is_off_by_default():
    config = FilterConfig()
    assert (config.orthogonal, config.max_amplified_ratio) == (False, None)


def test_speedup_and_the_new_options_round_trip_through_yaml(tmp_path):
    from lightning_grokfast.cli.fit import TASK_TRAINER_DEFAULTS, GrokfastCLI

    config = tmp_path / "speedup.yaml"
    config.write_text("grokfast:\n  filter: ma\n  speedup: 50\n  orthogonal: true\n  max_amplified_ratio: 3.0\n")
    cli = GrokfastCLI(trainer_defaults=TASK_TRAINER_DEFAULTS, args=["--config", str(config)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GrokfastCallback)]
    assert (callback.config.window_size, callback.config.orthogonal, callback.config.max_amplified_ratio) == (
        50,
        True,
        3.0,
    )


def test_divergence_guard_adds_nothing_when_the_slow_term_is_not_finite():
    # check_finite=False trusts the gradients, so an inf one enters the EMA; the guard then adds nothing (not NaN)
    filt = GradientFilter("ema", alpha=0.9, lamb=2.0, max_amplified_ratio=10.0, check_finite=False)
    filt.step(["w"], [torch.tensor([1.0, float("inf"), 1.0])])
    grad = [torch.tensor([1.0, 2.0, 3.0])]
    info = filt.step(["w"], grad, compute_norms=True)
    assert not torch.isfinite(filt.states["w"].ema).all()
    assert float(info.guard_scale) == 0.0
    assert torch.equal(grad[0], torch.tensor([1.0, 2.0, 3.0]))  # the raw gradient, not NaN


def test_orthogonal_leaves_no_autograd_history_on_gradients_or_state():
    # the parameters require grad; a product with them must not chain each step's gradient and EMA to the last
    # (that held every step's tensors: a modular-arithmetic run with orthogonal=True grew past 20 GB)
    w = nn.Parameter(torch.randn(5, 3))
    filt = GradientFilter("ema", orthogonal=True, max_amplified_ratio=2.0)
    for _ in range(3):
        w.grad = torch.randn(5, 3)
        filt.step(["w"], [w.grad], params=[w])
        assert w.grad.grad_fn is None and not w.grad.requires_grad
        assert filt.states["w"].ema.grad_fn is None
    grads = [torch.randn(5, 3)]
    orthogonalize_(grads, [w])
    assert grads[0].grad_fn is None
