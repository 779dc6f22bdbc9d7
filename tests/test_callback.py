"""GrokfastCallback in real Lightning runs on tiny CPU models."""

from __future__ import annotations

import copy
import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from benchmarks.reference import ReferenceEMA, ReferenceMA
from lightning_grokfast import GrokfastCallback
from tests.helpers import GradRecorder, StepGradRecorder, TinyModel, reference_run, trainer

FILTERS = {
    "ema": (dict(filter="ema", alpha=0.8, lamb=2.0), lambda: ReferenceEMA(0.8, 2.0)),
    "ma": (dict(filter="ma", window_size=3, lamb=5.0), lambda: ReferenceMA(3, 5.0)),
}


def params_of(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", list(FILTERS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_trainer_run_matches_plain_loop_with_reference_filter(kind, optimizer):
    kwargs, make_reference = FILTERS[kind]
    model = TinyModel(optimizer=optimizer)
    expected = reference_run(copy.deepcopy(model), make_reference(), steps=10)
    trainer(max_steps=10, callbacks=[GrokfastCallback(**kwargs)]).fit(model)
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_filters_once_per_optimizer_step_on_the_accumulated_gradient():
    model = TinyModel()
    expected = reference_run(copy.deepcopy(model), ReferenceEMA(0.8, 2.0), steps=4, accumulate=3)
    callback = GrokfastCallback(filter="ema", alpha=0.8, lamb=2.0)
    trainer(max_steps=4, accumulate_grad_batches=3, callbacks=[callback]).fit(model)
    assert callback.filters[0].steps == 4
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5)


class TwoOptimizerModule(pl.LightningModule):
    """A GAN-shaped manual-optimization module: the generator steps every batch, the critic every other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = nn.Linear(4, 4)
        self.critic = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        gen_opt, critic_opt = self.optimizers()
        (x,) = batch
        gen_loss = -self.critic(self.generator(x)).mean()
        gen_opt.zero_grad()
        self.manual_backward(gen_loss)
        gen_opt.step()
        if batch_idx % 2 == 0:
            critic_loss = self.critic(self.generator(x).detach()).mean() - self.critic(x).mean()
            critic_opt.zero_grad()
            self.manual_backward(critic_loss)
            critic_opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.SGD(self.critic.parameters(), 1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 4)), batch_size=8)


def test_each_optimizer_has_its_own_state_updated_once_per_its_own_step():
    callback = GrokfastCallback(filter="ema")
    trainer(max_epochs=1, callbacks=[callback]).fit(TwoOptimizerModule())
    gen_filter, critic_filter = callback.filters[0], callback.filters[1]
    assert gen_filter.steps == 6 and critic_filter.steps == 3
    assert gen_filter.state_names() == {"generator.weight", "generator.bias"}
    assert critic_filter.state_names() == {"critic.weight", "critic.bias"}


class OverflowAt(TinyModel):
    """Returns an infinite loss at one batch: under 16-mixed the scaler skips that optimizer step."""

    def __init__(self, bad_batch: int, **kwargs) -> None:
        super().__init__(optimizer="adam", lr=0.01, **kwargs)
        self.bad_batch = bad_batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.bad_batch else loss


class NaiveEMA(Callback):
    """What a filter without a finiteness check does (the bug this package avoids)."""

    def __init__(self) -> None:
        self.slow: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.parameters():
            slow = self.slow.setdefault(id(p), p.grad.clone())
            slow.mul_(0.9).add_(p.grad, alpha=0.1)
            p.grad.add_(slow, alpha=2.0)


def amp_trainer(callback, **kwargs):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return trainer(max_steps=8, callbacks=[callback], plugins=[plugin], **kwargs)


def test_amp_overflow_step_never_enters_the_filter_and_weights_stay_finite():
    callback = GrokfastCallback(filter="ema", alpha=0.9, lamb=2.0)
    model = OverflowAt(bad_batch=2)
    amp_trainer(callback).fit(model)
    assert callback.filters[0].skipped_steps == 1
    assert callback.filters[0].steps == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = callback.filters[0].state_dict()["params"]
    assert all(torch.isfinite(entry["ema"]).all() for entry in state.values())


def test_a_naive_filter_is_poisoned_by_the_same_overflow():
    """The scenario above really overflows: without the check the weights end up non-finite."""
    model = OverflowAt(bad_batch=2)
    amp_trainer(NaiveEMA()).fit(model)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


class StateRecorder(Callback):
    """Copies the GrokfastCallback's filter state after its hook, at every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grokfast = next(c for c in trainer.callbacks if isinstance(c, GrokfastCallback))
        self.states.append(copy.deepcopy(grokfast.filters[0].state_dict()["params"]))


def test_overflow_step_leaves_the_filter_state_exactly_as_before_it():
    recorder = StateRecorder()
    run = amp_trainer(GrokfastCallback(filter="ema", alpha=0.9, lamb=2.0))
    run.callbacks.append(recorder)
    run.fit(OverflowAt(bad_batch=2))
    for name, entry in recorder.states[1].items():
        assert torch.equal(recorder.states[2][name]["ema"], entry["ema"])  # step 2 overflowed: unchanged
        assert not torch.equal(recorder.states[3][name]["ema"], entry["ema"])  # step 3 updates again


def test_fused_optimizer_is_refused_under_16_mixed():
    class Fused(TinyModel):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)

    with pytest.raises(MisconfigurationException, match="fused"):
        amp_trainer(GrokfastCallback()).fit(Fused())


def test_gradient_clipping_applies_to_the_amplified_gradient():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.0, lamb=3.0)  # alpha 0: amplified = 4 x raw
    trainer(max_steps=3, gradient_clip_val=0.05, callbacks=[raw, callback, used]).fit(TinyModel())
    for before, after in zip(raw.grads, used.grads):
        raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before.values()]))
        used_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in after.values()]))
        assert used_norm == pytest.approx(0.05, rel=1e-4)
        assert 4 * raw_norm > 0.05
        for name in before:
            scale = 0.05 / (4 * raw_norm)  # clip of the amplified gradient, same direction
            torch.testing.assert_close(after[name], before[name] * 4 * scale, atol=1e-7, rtol=1e-4)


def test_start_step_defers_amplification_while_the_state_warms_up():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.5, lamb=1.0, start_step=3)
    trainer(max_steps=5, callbacks=[raw, callback, used]).fit(TinyModel())
    reference = ReferenceEMA(0.5, 1.0)
    for step, (before, after) in enumerate(zip(raw.grads, used.grads)):
        expected = reference(dict(before))
        for name in before:
            target = before[name] if step < 3 else expected[name]
            torch.testing.assert_close(after[name], target)


class SwitchAt(Callback):
    def __init__(self, step: int, **changes) -> None:
        self.step, self.changes = step, changes

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            grokfast = next(c for c in trainer.callbacks if isinstance(c, GrokfastCallback))
            for key, value in self.changes.items():
                setattr(grokfast, key, value)


def test_disabled_callback_leaves_gradients_and_state_alone_until_switched_on():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.5, lamb=1.0, enabled=False)
    trainer(max_steps=5, callbacks=[SwitchAt(3, enabled=True), raw, callback, used]).fit(TinyModel())
    for step, (before, after) in enumerate(zip(raw.grads, used.grads)):
        for name in before:
            if step < 3:
                assert torch.equal(after[name], before[name])
            elif step == 3:  # first filtered step: the EMA starts at this gradient, so g + 1 * g
                torch.testing.assert_close(after[name], 2 * before[name])
    assert callback.filters[0].steps == 2


def test_lamb_and_alpha_can_be_changed_during_training():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.5, lamb=1.0)
    trainer(max_steps=4, callbacks=[SwitchAt(2, lamb=0.0, alpha=0.25), raw, callback, used]).fit(TinyModel())
    assert (callback.lamb, callback.alpha) == (0.0, 0.25)
    assert callback.filters[0].alpha == 0.25
    for before, after in zip(raw.grads[2:], used.grads[2:]):
        for name in before:
            assert torch.equal(after[name], before[name])


def test_exclude_patterns_leave_matching_parameters_unfiltered():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.5, lamb=1.0, exclude=[r"\.bias$"])
    trainer(max_steps=3, callbacks=[raw, callback, used]).fit(TinyModel())
    assert callback.filters[0].state_names() == {"body.weight", "head.weight"}
    for before, after in zip(raw.grads[1:], used.grads[1:]):
        assert torch.equal(after["body.bias"], before["body.bias"])
        assert not torch.equal(after["body.weight"], before["body.weight"])


def test_lamb_scale_overrides_amplification_by_name_pattern():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.0, lamb=1.0, lamb_scale={"^head": 3.0})
    trainer(max_steps=1, callbacks=[raw, callback, used]).fit(TinyModel())
    torch.testing.assert_close(used.grads[0]["head.weight"], 4 * raw.grads[0]["head.weight"])
    torch.testing.assert_close(used.grads[0]["body.weight"], 2 * raw.grads[0]["body.weight"])


class PartlyFrozen(TinyModel):
    """`head` is frozen until global step 3; `unused` never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(2, 2)
        self.head.requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            self.head.requires_grad_(True)


def test_parameters_without_gradients_are_skipped_and_unfrozen_ones_start_their_own_state():
    raw, used = GradRecorder(), StepGradRecorder()
    callback = GrokfastCallback(filter="ema", alpha=0.5, lamb=1.0)
    trainer(max_steps=5, callbacks=[raw, callback, used]).fit(PartlyFrozen())
    assert callback.filters[0].state_names() == {"body.weight", "body.bias", "head.weight", "head.bias"}
    # the head's first gradient (step 3) starts its EMA: amplified = 2 x raw
    torch.testing.assert_close(used.grads[3]["head.weight"], 2 * raw.grads[3]["head.weight"])
    assert all(step["unused.weight"] is None for step in raw.grads)


def test_lbfgs_fails_loudly():
    with pytest.raises(MisconfigurationException, match="LBFGS"):
        trainer(max_steps=2, callbacks=[GrokfastCallback()]).fit(TinyModel(optimizer="lbfgs"))


def test_statistics_are_logged_only_on_logging_steps(tmp_path: Path):
    logger = CSVLogger(tmp_path, name="run")
    callback = GrokfastCallback(filter="ema", alpha=0.9, lamb=2.0)
    trainer(max_steps=10, log_every_n_steps=5, logger=logger, callbacks=[callback]).fit(TinyModel())
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("grokfast/lamb")]
    assert [int(row["step"]) for row in rows] == [4, 9]
    for row in rows:
        assert float(row["grokfast/lamb"]) == 2.0
        assert float(row["grokfast/alpha"]) == pytest.approx(0.9)
        assert float(row["grokfast/skipped_steps"]) == 0.0
        ratio = float(row["grokfast/slow_norm"]) / float(row["grokfast/grad_norm"])
        assert float(row["grokfast/slow_to_grad_ratio"]) == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize("kind", ["ema", "ma", "ema+ma"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path, kind):
    kwargs = dict(filter=kind, alpha=0.8, lamb=2.0, window_size=4, ma_lamb=1.0, resum_every=5)
    straight = TinyModel(optimizer="adam", lr=0.01)
    trainer(max_epochs=2, callbacks=[GrokfastCallback(**kwargs)]).fit(straight)  # 6 batches an epoch

    first = TinyModel(optimizer="adam", lr=0.01)
    run = trainer(max_epochs=1, callbacks=[GrokfastCallback(**kwargs)])
    run.fit(first)
    checkpoint = tmp_path / "half.ckpt"
    run.save_checkpoint(checkpoint)
    resumed = TinyModel(optimizer="adam", lr=0.01)
    callback = GrokfastCallback(**kwargs)
    trainer(max_epochs=2, callbacks=[callback]).fit(resumed, ckpt_path=checkpoint)
    assert callback.filters[0].steps == 12
    for name, value in params_of(resumed).items():
        assert torch.equal(value, params_of(straight)[name]), name


def test_checkpoint_loads_with_weights_only_and_holds_state_by_parameter_name(tmp_path: Path):
    run = trainer(max_steps=3, callbacks=[GrokfastCallback(filter="ma", window_size=2)])
    run.fit(TinyModel())
    run.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)
    (optimizer_state,) = checkpoint["optimizer_states"]
    # the filter state travels with the optimizer's, per parameter (index order: body.weight, body.bias, head...)
    for entry in optimizer_state["state"].values():
        assert entry["grokfast_ma_history"].shape[0] == 2
        assert entry["grokfast_ma_count"] == 2
    assert len(optimizer_state["state"]) == 4


def test_boosted_lamb_is_restored_on_resume(tmp_path: Path):
    callback = GrokfastCallback(filter="ema", lamb=2.0)
    run = trainer(max_steps=2, callbacks=[callback])
    run.fit(TinyModel())
    callback.boost_lamb(3.0, max_lamb=5.0)
    assert callback.lamb == 5.0
    run.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GrokfastCallback(filter="ema", lamb=2.0)
    trainer(max_steps=3, callbacks=[resumed]).fit(TinyModel(), ckpt_path=tmp_path / "c.ckpt")
    assert resumed.lamb == 5.0


class Wider(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)


def test_resuming_filter_state_into_a_different_model_names_the_mismatch(tmp_path: Path):
    run = trainer(max_steps=2, callbacks=[GrokfastCallback()])
    run.fit(TinyModel())
    run.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)
    # keep the model weights loadable; only the filter state (in the optimizer state) is for the old shapes
    state["state_dict"] = Wider().state_dict()
    torch.save(state, tmp_path / "mismatch.ckpt")
    with pytest.raises(ValueError, match=r"'body.weight' has shape \(3, 4\), its parameter \(5, 4\)"):
        trainer(max_steps=4, callbacks=[GrokfastCallback()]).fit(Wider(), ckpt_path=tmp_path / "mismatch.ckpt")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filter": "kalman"}, r"`filter` must be one of \['ema', 'ma', 'ema\+ma', 'none'\]"),
        ({"alpha": 1.2}, r"`alpha` must be a number in \[0, 1\)"),
        ({"lamb": -0.5}, "`lamb` must be a finite number >= 0"),
        ({"window_size": 0}, "`window_size` must be an integer >= 1"),
        ({"start_step": -1}, "`start_step` must be an integer >= 0"),
        ({"exclude": ["("]}, "`exclude` holds an invalid regular expression"),
        ({"lamb_scale": {"head": -1.0}}, "lamb_scale"),
        ({"filter_type": "median"}, "`filter_type` must be one of"),
        ({"state_dtype": "int32"}, "`state_dtype`"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrokfastCallback(**kwargs)


class SkipsBackwardAt(TinyModel):
    """Returns None (no backward) at one batch: the optimizer step happens with no gradients."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


def test_step_without_gradients_leaves_the_filter_alone():
    callback = GrokfastCallback(filter="ema")
    trainer(max_steps=4, callbacks=[callback]).fit(SkipsBackwardAt())
    assert callback.filters[0].steps == 3


def test_bf16_true_parameters_keep_float32_filter_state():
    callback = GrokfastCallback(filter="ema")
    model = TinyModel()
    trainer(max_steps=3, precision="bf16-true", callbacks=[callback]).fit(model)
    assert next(model.parameters()).dtype == torch.bfloat16
    state = callback.filters[0].state_dict()["params"]
    assert {entry["ema"].dtype for entry in state.values()} == {torch.float32}


def test_lamb_is_restored_from_a_checkpoint_written_before_the_compile_option(tmp_path: Path):
    callback = GrokfastCallback(filter="ema", lamb=2.0)
    callback.boost_lamb(2.0)
    state = callback.state_dict()
    del state["user"]["config"]["compile"]  # as written by 0.2, which had no `compile` field
    resumed = GrokfastCallback(filter="ema", lamb=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a field the checkpoint lacks, at its default, is no difference
        resumed.load_state_dict(state)
    assert resumed.lamb == 4.0


def test_bfloat16_state_dtype_keeps_a_float32_model_state_in_bfloat16():
    callback = GrokfastCallback(filter="ema+ma", window_size=3, state_dtype="bfloat16")
    trainer(max_steps=3, callbacks=[callback]).fit(TinyModel())
    states = callback.filters[0].states.values()
    assert all(s.ema.dtype == s.ma_history.dtype == torch.bfloat16 for s in states)
    assert all(s.ma_sum.dtype == torch.float32 for s in states)
