"""attach_grokfast: Grokfast in a plain PyTorch loop, with the state in the optimizer's state_dict."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from benchmarks.reference import ReferenceEMA, ReferenceMA
from lightning_grokfast import attach_grokfast


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 4, generator=generator).to(dtype), torch.randint(0, 2, (16,), generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step, next(model.parameters()).dtype)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()


def round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


KINDS = {
    "ema": dict(filter="ema", alpha=0.8, lamb=2.0),
    "ma": dict(filter="ma", window_size=4, lamb=5.0, resum_every=3),
    "ema+ma": dict(filter="ema+ma", alpha=0.8, lamb=1.0, window_size=4, ma_lamb=1.0),
    "ema-guard-orthogonal": dict(filter="ema", alpha=0.8, lamb=2.0, max_amplified_ratio=0.5, orthogonal=True),
}


@pytest.mark.parametrize(("kind", "reference"), [("ema", ReferenceEMA(0.8, 2.0)), ("ma", ReferenceMA(4, 5.0))])
def test_plain_loop_matches_the_published_algorithm(kind, reference):
    model, ref_model = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    kwargs = KINDS[kind] if kind == "ema" else dict(filter="ma", window_size=4, lamb=5.0)
    attach_grokfast(optimizer, model=model, **kwargs)
    for step in range(12):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        ref_optimizer.zero_grad()
        nn.functional.cross_entropy(ref_model(x), y).backward()
        for name, grad in reference({n: p.grad for n, p in ref_model.named_parameters()}).items():
            dict(ref_model.named_parameters())[name].grad = grad
        ref_optimizer.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_and_load_through_the_optimizer_state_dict_is_bit_identical(kind):
    straight = make_model()
    optimizer = torch.optim.Adam(straight.parameters(), lr=0.01)
    attach_grokfast(optimizer, model=straight, **KINDS[kind])
    train(straight, optimizer, range(12))

    first = make_model()
    optimizer = torch.optim.Adam(first.parameters(), lr=0.01)
    attach_grokfast(optimizer, model=first, **KINDS[kind])
    train(first, optimizer, range(6))
    checkpoint = round_trip({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    assert all(any(k.startswith("grokfast_") for k in e) for e in checkpoint["optimizer"]["state"].values())
    assert checkpoint["optimizer"]["grokfast"]["steps"] == 6
    # the optimizer's own live state never holds a filter key (Adam initialises only an empty state)
    assert not any(k.startswith("grokfast_") for state in optimizer.state.values() for k in state)

    resumed = make_model()
    optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    handle = attach_grokfast(optimizer, model=resumed, **KINDS[kind])
    resumed.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert handle.filter.steps == 6
    train(resumed, optimizer, range(6, 12))
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_float32_state_of_bfloat16_parameters_is_not_cast_on_load():
    model = make_model(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_grokfast(optimizer, model=model, filter="ema")
    train(model, optimizer, range(2))
    saved = round_trip(optimizer.state_dict())
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_grokfast(fresh, model=model, filter="ema")
    fresh.load_state_dict(saved)
    assert {s.ema.dtype for s in handle.filter.states.values()} == {torch.float32}
    for name, state in handle.filter.states.items():
        index = [n for n, _ in model.named_parameters()].index(name)
        assert torch.equal(state.ema, saved["state"][index]["grokfast_ema"])


def test_grad_scaler_skips_the_overflow_step_and_the_filter_never_sees_it():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    handle = attach_grokfast(optimizer, model=model, filter="ema", alpha=0.8, scaler=scaler)
    for step in range(5):
        x, y = batch(step)
        optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if step == 3:
            model[0].weight.grad[0, 0] = float("inf")
            before = {n: s.ema.clone() for n, s in handle.filter.states.items()}
        scaler.step(optimizer)
        scaler.update()
        if step == 3:
            assert all(torch.equal(s.ema, before[n]) for n, s in handle.filter.states.items())
    assert handle.filter.steps == 4  # the overflow step never reached optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scaler_verdict_is_used_and_gradients_are_unscaled_when_filtered():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = attach_grokfast(optimizer, model=model, filter="ema", lamb=0.0, scaler=scaler)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    for state, grad in zip(handle.filter.states.values(), raw):
        torch.testing.assert_close(state.ema, grad)  # the EMA started at the unscaled gradient


def test_without_scaler_a_non_finite_gradient_is_skipped():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach_grokfast(optimizer, model=model, filter="ma", window_size=3)
    train(model, optimizer, range(2))
    x, y = batch(5)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad[0] = float("nan")
    optimizer.step()
    assert handle.filter.skipped_steps == 1
    assert all(s.ma_count == 2 and torch.isfinite(s.ma_sum).all() for s in handle.filter.states.values())


def test_remove_restores_the_plain_optimizer():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, model=model, filter="ema", lamb=2.0)
    train(model, optimizer, range(2))
    handle.remove()
    x, y = batch(3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, b - 0.1 * g)
    assert "grokfast" not in str(list(optimizer.state_dict()))
    assert not handle.attached


def test_settings_are_live_and_validated():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, model=model)
    handle.lamb, handle.alpha = 4.0, 0.5
    assert handle.filter.lamb == 4.0 and handle.filter.alpha == 0.5
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\)"):
        handle.alpha = 1.0
    with pytest.raises(ValueError, match="`lamb` must be a finite number >= 0"):
        attach_grokfast(torch.optim.SGD(make_model().parameters(), lr=0.1), lamb=-1.0)
    with pytest.raises(ValueError, match="pass `model=`"):
        attach_grokfast(torch.optim.SGD(make_model().parameters(), lr=0.1), exclude="bias")


def test_exclude_start_step_and_parameters_added_later():
    model = make_model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, model=model, filter="ema", exclude="bias", start_step=2)
    train(model, optimizer, range(2))
    assert sorted(handle.filter.states) == ["0.weight"]
    optimizer.add_param_group({"params": model[2].parameters()})
    train(model, optimizer, range(2, 3))
    assert sorted(handle.filter.states) == ["0.weight", "2.weight"]


def test_two_filters_on_the_same_parameters_are_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_grokfast(optimizer, model=model, filter="ema")
    second = attach_grokfast(optimizer, model=model, filter="ma")
    with pytest.raises(ValueError, match="would both filter the gradients of"):
        train(model, optimizer, range(1))
    second.remove()


@pytest.mark.parametrize("kind", list(KINDS))
def test_attach_after_load_state_dict_resumes_bit_identically(kind):
    straight = make_model()
    optimizer = torch.optim.Adam(straight.parameters(), lr=0.01)
    attach_grokfast(optimizer, model=straight, **KINDS[kind])
    train(straight, optimizer, range(9))

    first = make_model()
    optimizer = torch.optim.Adam(first.parameters(), lr=0.01)
    attach_grokfast(optimizer, model=first, **KINDS[kind])
    train(first, optimizer, range(6))
    checkpoint = round_trip({"model": first.state_dict(), "optimizer": optimizer.state_dict()})

    resumed = make_model()  # the order of a script that rebuilds its optimizer: load, then attach
    resumed.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    optimizer.load_state_dict(checkpoint["optimizer"])
    handle = attach_grokfast(optimizer, model=resumed, **KINDS[kind])
    assert handle.filter.steps == 6 and len(handle.filter.states) == 4
    # the optimizer's own state is as if the filter had been attached before the load
    assert not any(str(k).startswith("grokfast") for state in optimizer.state.values() for k in state)
    assert all("grokfast" not in group for group in optimizer.param_groups)
    train(resumed, optimizer, range(6, 9))
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("attach_first", [True, False], ids=["attach-then-load", "load-then-attach"])
@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        (dict(filter="ema"), dict(filter="ma", window_size=4), "was made by filter='ema'; this filter is 'ma'"),
        (dict(filter="ma", window_size=4), dict(filter="ma", window_size=5), "has window_size=4; this filter has"),
    ],
    ids=["kind", "window"],
)
def test_a_mismatched_checkpoint_is_the_same_error_in_both_orders(attach_first, saved, now, message):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_grokfast(optimizer, model=model, **saved)
    train(model, optimizer, range(2))
    checkpoint = round_trip(optimizer.state_dict())
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        if attach_first:
            attach_grokfast(fresh, model=model, **now)
            fresh.load_state_dict(checkpoint)
        else:
            fresh.load_state_dict(checkpoint)
            attach_grokfast(fresh, model=model, **now)


def test_load_then_attach_with_bfloat16_parameters_warns_that_torch_rounded_the_state():
    model = make_model(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_grokfast(optimizer, model=model, filter="ema+ma", window_size=3)
    train(model, optimizer, range(4))
    saved = round_trip(optimizer.state_dict())
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    fresh.load_state_dict(saved)  # torch casts floating state to the parameters' bfloat16 here
    with pytest.warns(UserWarning, match="cast its state to the parameters' dtype"):
        handle = attach_grokfast(fresh, model=model, filter="ema+ma", window_size=3)
    assert {s.ema.dtype for s in handle.filter.states.values()} == {torch.float32}
    assert {s.ma_sum.dtype for s in handle.filter.states.values()} == {torch.float32}


def test_a_closure_computing_the_gradients_inside_step_is_filtered_once_per_step():
    def run(closure_style: bool) -> tuple[nn.Module, int]:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = attach_grokfast(optimizer, model=model, filter="ema", alpha=0.8, lamb=2.0)
        for step in range(4):
            x, y = batch(step)

            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if closure_style:
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
        return model, handle.filter.steps

    plain, plain_steps = run(False)
    with_closure, closure_steps = run(True)
    assert plain_steps == closure_steps == 4
    for p, q in zip(plain.parameters(), with_closure.parameters()):
        assert torch.equal(p, q)


def test_an_optimizer_whose_step_requires_a_closure_is_refused_at_attach_time():
    model = make_model()
    with pytest.raises(ValueError, match="cannot filter LBFGS: its step\\(\\) requires a closure"):
        attach_grokfast(torch.optim.LBFGS(model.parameters()), model=model)


def test_a_step_with_no_gradient_to_filter_warns_once():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, model=model)
    optimizer.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="none of its 4 filtered parameters had a gradient"):
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # said once
    assert handle.filter.steps == 0


def test_a_refused_attach_leaves_the_loaded_state_and_the_optimizer_unhooked():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, model=model, filter="ema")
    train(model, optimizer, range(2))
    saved = round_trip(optimizer.state_dict())
    handle.remove()
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    fresh.load_state_dict(saved)
    with pytest.raises(ValueError, match="this filter is 'ma'"):
        attach_grokfast(fresh, model=model, filter="ma")
    assert not fresh._optimizer_step_pre_hooks and not fresh._optimizer_state_dict_post_hooks
    assert attach_grokfast(fresh, model=model, filter="ema").filter.steps == 2  # the right filter still adopts it


def test_a_closure_passed_by_keyword_is_filtered_too():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_grokfast(optimizer, model=model, filter="ema")
    x, y = batch(0)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert optimizer.step(closure=closure) is not None
    assert handle.filter.steps == 1 and len(handle.filter.states) == 4
