"""GrokfastCallback in the setups people really have: string patterns, parameters joining mid-run, two callbacks,
a changed configuration on resume, tied weights, a callback reused across fits, manual optimization, and
checkpoints written by lightning-grokfast 0.1."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from benchmarks.reference import ReferenceEMA
from lightning_grokfast import GrokfastCallback
from tests.helpers import TinyModel, make_data, trainer

DATA = Path(__file__).parent / "data"


def params_of(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------- 1. patterns given as one string
def test_exclude_given_as_one_string_is_one_pattern_not_characters():
    callback = GrokfastCallback(exclude="bias")
    assert [p.pattern for p in callback.exclude] == ["bias"]
    trainer(max_steps=2, callbacks=[callback]).fit(TinyModel())
    assert sorted(callback.filters[0].states) == ["body.weight", "head.weight"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exclude": 5}, r"`exclude` must be a regular expression \(str\) or a list of them, got 5"),
        ({"exclude": ["bias", 3]}, "`exclude` must be a regular expression"),
        ({"lamb_scale": [("head", 2.0)]}, "`lamb_scale` must be a mapping of name pattern to factor"),
        ({"lamb_scale": {"head": "2"}}, r"`lamb_scale\['head'\]` must be a finite number >= 0"),
    ],
)
def test_pattern_arguments_of_the_wrong_type_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrokfastCallback(**kwargs)


# ---------------------------------------------------------------------- 7. booleans
@pytest.mark.parametrize("argument", ["warmup", "normalize", "enabled", "log_stats", "check_finite", "orthogonal"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_boolean_arguments_refuse_non_booleans(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}` must be True or False"):
        GrokfastCallback(**{argument: value})


def test_enabled_set_during_training_is_validated_too():
    callback = GrokfastCallback()
    with pytest.raises(ValueError, match="`enabled` must be True or False"):
        callback.enabled = "false"


# ---------------------------------------------------------------------- 2. parameters added mid-run
class Backbone(pl.LightningModule):
    """A backbone frozen and left out of the optimizer until BackboneFinetuning adds it (epoch 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_data(24), batch_size=8)


def finetuning() -> BackboneFinetuning:
    return BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0, verbose=False)


def test_parameters_added_by_backbone_finetuning_are_filtered_from_their_first_gradient():
    callback = GrokfastCallback(filter="ema", alpha=0.5, lamb=1.0)
    model = Backbone()
    trainer(max_epochs=2, callbacks=[finetuning(), callback]).fit(model)  # 3 steps an epoch
    states = callback.filters[0].states
    assert set(states) == {"backbone.weight", "backbone.bias", "head.weight", "head.bias"}
    assert states["backbone.weight"].ema_started
    assert callback.filters[0].steps == 6


def test_state_of_parameters_added_mid_run_survives_resume(tmp_path: Path):
    """(A resume across BackboneFinetuning is not bit-identical in Lightning 2.6 even without Grokfast, so this
    compares the filter state itself: what the checkpoint holds is what the resumed filter holds.)"""
    kwargs = dict(filter="ema+ma", alpha=0.5, lamb=1.0, window_size=2, ma_lamb=1.0)
    run = trainer(max_epochs=2, callbacks=[finetuning(), GrokfastCallback(**kwargs)])
    run.fit(Backbone())
    run.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["optimizer_states"][0]
    # the backbone joined as the second parameter group: indices 2 and 3
    assert saved["param_groups"][1]["params"] == [2, 3]
    callback = GrokfastCallback(**kwargs)
    trainer(max_epochs=2, callbacks=[finetuning(), callback]).fit(Backbone(), ckpt_path=tmp_path / "c.ckpt")
    states = callback.filters[0].states
    for index, name in ((2, "backbone.weight"), (3, "backbone.bias")):
        assert torch.equal(states[name].ema, saved["state"][index]["grokfast_ema"]), name
        assert torch.equal(states[name].ma_history, saved["state"][index]["grokfast_ma_history"]), name
        assert states[name].ma_count == 2


# ---------------------------------------------------------------------- 3. configuration on resume
def test_configuration_passed_on_resume_wins_and_the_difference_is_reported(tmp_path: Path):
    run = trainer(max_steps=2, callbacks=[GrokfastCallback(enabled=False, lamb=2.0)])
    run.fit(TinyModel())
    run.save_checkpoint(tmp_path / "c.ckpt")
    callback = GrokfastCallback(enabled=True, lamb=5.0)
    with pytest.warns(UserWarning, match=r"differs from the checkpoint's .*lamb: checkpoint 2.0, now 5.0"):
        trainer(max_steps=4, callbacks=[callback]).fit(TinyModel(), ckpt_path=tmp_path / "c.ckpt")
    assert callback.enabled
    assert callback.lamb == 5.0
    assert callback.filters[0].steps == 2  # it really filtered after the resume


def test_values_changed_by_training_are_restored_when_the_configuration_is_unchanged(tmp_path: Path):
    callback = GrokfastCallback(filter="ema", alpha=0.9, lamb=2.0)
    run = trainer(max_steps=2, callbacks=[callback])
    run.fit(TinyModel())
    callback.boost_lamb(2.0)
    callback.alpha = 0.95
    run.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GrokfastCallback(filter="ema", alpha=0.9, lamb=2.0)
    trainer(max_steps=3, callbacks=[resumed]).fit(TinyModel(), ckpt_path=tmp_path / "c.ckpt")
    assert (resumed.lamb, resumed.alpha) == (4.0, 0.95)


# ---------------------------------------------------------------------- 4. two callbacks
def two_filters() -> list[GrokfastCallback]:
    return [
        GrokfastCallback(filter="ema", alpha=0.8, lamb=2.0, exclude="head"),
        GrokfastCallback(filter="ma", window_size=3, lamb=1.0, exclude="body"),
    ]


def test_two_callbacks_filter_disjoint_parameters_and_each_resumes_its_own_state(tmp_path: Path):
    straight = TinyModel(optimizer="adam", lr=0.01)
    trainer(max_epochs=2, callbacks=two_filters()).fit(straight)

    first = TinyModel(optimizer="adam", lr=0.01)
    run = trainer(max_epochs=1, callbacks=two_filters())
    run.fit(first)
    run.save_checkpoint(tmp_path / "c.ckpt")
    ema, ma = two_filters()
    resumed = TinyModel(optimizer="adam", lr=0.01)
    trainer(max_epochs=2, callbacks=[ema, ma]).fit(resumed, ckpt_path=tmp_path / "c.ckpt")
    assert ema.state_key != ma.state_key
    assert sorted(ema.filters[0].states) == ["body.bias", "body.weight"]
    assert sorted(ma.filters[0].states) == ["head.bias", "head.weight"]
    assert ema.filters[0].steps == ma.filters[0].steps == 12
    for name, value in params_of(resumed).items():
        assert torch.equal(value, params_of(straight)[name]), name


def test_overlapping_callbacks_are_refused_naming_the_parameters():
    callbacks = [GrokfastCallback(filter="ema"), GrokfastCallback(filter="ma", exclude="bias")]
    with pytest.raises(MisconfigurationException, match=r"would both filter the gradients of \['body.weight'"):
        trainer(max_steps=1, callbacks=callbacks).fit(TinyModel())


# ---------------------------------------------------------------------- 8. a tied weight listed twice
class TiedTwice(TinyModel):
    def configure_optimizers(self):
        params = [self.body.weight, self.body.weight, self.body.bias, self.head.weight, self.head.bias]
        return torch.optim.SGD([{"params": params}], lr=0.1)


def test_a_weight_listed_twice_in_a_group_is_filtered_once_per_step():
    model = TiedTwice()
    reference_model = copy.deepcopy(model)
    callback = GrokfastCallback(filter="ema", alpha=0.8, lamb=2.0)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        trainer(max_steps=5, callbacks=[callback]).fit(model)
    assert sorted(callback.filters[0].states) == ["body.bias", "body.weight", "head.bias", "head.weight"]
    # the same as filtering each gradient once (SGD steps a listed-twice weight twice, in both runs)
    reference = ReferenceEMA(0.8, 2.0)
    optimizer = reference_model.configure_optimizers()
    data = make_data()
    for step in range(5):
        x, y = data[step * 8 : (step + 1) * 8]
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference_model(x), y).backward()
        for name, grad in reference({n: p.grad for n, p in reference_model.named_parameters()}).items():
            dict(reference_model.named_parameters())[name].grad = grad
        optimizer.step()
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, params_of(reference_model)[name])


# ---------------------------------------------------------------------- 9. one callback, several fits
def test_a_callback_reused_for_a_new_fit_starts_afresh_and_says_so(caplog):
    callback = GrokfastCallback(filter="ema")
    trainer(max_steps=3, callbacks=[callback]).fit(TinyModel())
    first = callback.filters[0]
    model = TinyModel()
    with caplog.at_level("INFO"):
        trainer(max_steps=2, callbacks=[callback]).fit(model)
    assert "start afresh" in caplog.text
    assert callback.filters[0] is not first
    assert callback.filters[0].steps == 2
    named = dict(model.named_parameters())
    assert all(state.ema.data_ptr() != named[n].data_ptr() for n, state in callback.filters[0].states.items())


class KeepsItsOptimizer(TinyModel):
    """Returns the same optimizer object from every `configure_optimizers` call."""

    def configure_optimizers(self):
        if not hasattr(self, "_kept"):
            self._kept = super().configure_optimizers()
        return self._kept


def test_a_callback_reused_with_the_same_optimizer_continues():
    callback = GrokfastCallback(filter="ema")
    model = KeepsItsOptimizer()
    trainer(max_steps=3, callbacks=[callback]).fit(model)
    first = callback.filters[0]
    trainer(max_steps=5, callbacks=[callback]).fit(model)
    assert callback.filters[0] is first
    assert first.steps == 3 + 5  # a new Trainer counts its steps from 0 again


# ---------------------------------------------------------------------- 10. manual optimization and clipping
class ClipsManually(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        self.clip_gradients(optimizer, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
        optimizer.step()


class RecordsNormAfterFilter(pl.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_manual_optimization_clips_the_raw_gradient_before_the_filter_sees_it():
    """Documented limit: with manual optimization `self.clip_gradients` runs in your training_step, before
    `opt.step()` calls the filter, so the filter's state is built from clipped gradients and the amplified
    gradient is not clipped again (here: the norm after the filter is (1 + lamb) times the clip value)."""
    callback = GrokfastCallback(filter="ema", alpha=0.0, lamb=2.0)
    recorder = RecordsNormAfterFilter()
    trainer(max_steps=3, callbacks=[callback, recorder]).fit(ClipsManually())
    for norm in recorder.norms:
        assert norm == pytest.approx(3e-3, rel=1e-4)


# ---------------------------------------------------------------------- checkpoints of lightning-grokfast 0.1
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_a_checkpoint_written_by_version_0_1_resumes_its_filter_state(kind):
    """tests/data/grokfast-0.1-*.ckpt: TinyModel(adam, lr=0.01), one epoch (6 steps) with GrokfastCallback(kind,
    alpha=0.8, lamb=2.0, window_size=4) of release 0.1, then `boost_lamb(1.5)`."""
    path = DATA / f"grokfast-0.1-{kind}.ckpt"
    saved = torch.load(path, weights_only=True)
    (legacy,) = [v for k, v in saved["callbacks"].items() if k.startswith("GrokfastCallback")]
    callback = GrokfastCallback(filter=kind, alpha=0.8, lamb=2.0, window_size=4)
    with pytest.warns(UserWarning, match=r"lamb: checkpoint 3.0, now 2.0.*0.1 checkpoint"):
        trainer(max_epochs=1, callbacks=[callback]).fit(TinyModel(optimizer="adam", lr=0.01), ckpt_path=path)
    states = callback.filters[0].states
    assert callback.filters[0].steps == 6
    for name, entry in legacy["filters"]["0"]["params"].items():
        field = "ema" if kind == "ema" else "ma_history"
        assert torch.equal(getattr(states[name], field), entry[field]), name


def test_an_unknown_checkpoint_format_names_the_versions_read():
    with pytest.raises(ValueError, match=r"reads checkpoints of lightning-grokfast 0.1 \(format 1\) and 0.2"):
        GrokfastCallback().load_state_dict({"format": 99, "filter": "ema"})
