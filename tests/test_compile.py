"""torch.compile: a compiled LightningModule under GrokfastCallback, and the fused EMA step (``compile=True``).

Compiling on CPU needs a C++ compiler; without one these tests are skipped.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from lightning_grokfast import GradientFilter, GrokfastCallback
from lightning_grokfast.core.config import FilterConfig
from tests.helpers import GradRecorder, TinyModel, trainer

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


def _filtered_grads(model: torch.nn.Module, **callback_kwargs) -> list[dict[str, torch.Tensor | None]]:
    recorder = GradRecorder()  # after the Grokfast callback: sees the filtered gradients
    trainer(max_steps=4, callbacks=[GrokfastCallback(**callback_kwargs), recorder]).fit(model)
    return recorder.grads


@needs_compiler
def test_compiled_module_gets_the_eager_filtered_gradients():
    eager = _filtered_grads(TinyModel(), filter="ema", alpha=0.8, lamb=2.0)
    compiled_model = TinyModel()
    compiled_model.compile()  # torch.compile of the module's forward, in place
    compiled = _filtered_grads(compiled_model, filter="ema", alpha=0.8, lamb=2.0)
    assert len(compiled) == len(eager) == 4
    for step_eager, step_compiled in zip(eager, compiled):
        assert step_eager.keys() == step_compiled.keys()
        for name, grad in step_eager.items():
            torch.testing.assert_close(step_compiled[name], grad, atol=1e-6, rtol=1e-5)


@needs_compiler
def test_compile_option_gives_the_foreach_result():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    names = [f"p{i}" for i in range(len(shapes))]
    foreach, fused = (
        GradientFilter("ema", alpha=0.9, lamb=2.0),
        GradientFilter("ema", alpha=0.9, lamb=2.0, compile=True),
    )
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        twins = [g.clone() for g in grads]
        foreach.step(names, grads)
        fused.step(names, twins)
        if step == 3:  # a changed lamb and alpha take effect without recompiling by hand
            foreach.lamb = fused.lamb = 3.0
            foreach.alpha = fused.alpha = 0.95
        for got, expected in zip(twins, grads):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for name in names:
        torch.testing.assert_close(fused.states[name].ema, foreach.states[name].ema, atol=1e-6, rtol=1e-6)


@needs_compiler
def test_compiled_callback_filters_like_the_foreach_callback():
    eager = _filtered_grads(TinyModel(), filter="ema", alpha=0.8, lamb=2.0)
    fused = _filtered_grads(TinyModel(), filter="ema", alpha=0.8, lamb=2.0, compile=True)
    for step_eager, step_fused in zip(eager, fused):
        for name, grad in step_eager.items():
            torch.testing.assert_close(step_fused[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filter": "ema+ma"}, "filter='ema' or 'ma'"),
        ({"filter": "ema", "normalize": True}, "normalize"),
        ({"filter": "ema", "max_amplified_ratio": 2.0}, "max_amplified_ratio"),
        ({"filter": "ema", "compile": "yes"}, "`compile`"),
    ],
)
def test_compile_option_rejects_what_it_cannot_fuse(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FilterConfig(**{"compile": True, **kwargs})


@needs_compiler
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_compile_option_gives_the_foreach_moving_average(state_dtype):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    names = [f"p{i}" for i in range(len(shapes))]
    kwargs = {"window_size": 3, "lamb": 5.0, "resum_every": 5, "state_dtype": state_dtype}
    foreach, fused = GradientFilter("ma", **kwargs), GradientFilter("ma", **kwargs, compile=True)
    for _ in range(12):  # warm-up, full window, a wrap of the ring, two re-summations
        grads = [torch.randn(s) for s in shapes]
        twins = [g.clone() for g in grads]
        foreach.step(names, grads)
        fused.step(names, twins)
        for got, expected in zip(twins, grads):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for name in names:
        assert torch.equal(fused.states[name].ma_history, foreach.states[name].ma_history)
        torch.testing.assert_close(fused.states[name].ma_sum, foreach.states[name].ma_sum, atol=1e-6, rtol=1e-6)
