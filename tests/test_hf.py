"""GrokfastTrainerCallback in a real Hugging Face ``transformers.Trainer`` (a tiny GPT-2 built from a config)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the `hf` extra

from lightning_grokfast.integrations.hf import GrokfastTrainerCallback  # noqa: E402

KINDS = {
    "ema": dict(filter="ema", alpha=0.8, lamb=2.0),
    "ma": dict(filter="ma", window_size=3, lamb=5.0),
    "ema+ma": dict(filter="ema+ma", alpha=0.8, lamb=1.0, window_size=3, ma_lamb=1.0),
}


class TokenData(torch.utils.data.Dataset):
    """32 random sequences of 8 tokens (language modelling: the labels are the inputs)."""

    def __init__(self) -> None:
        self.tokens = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def make_trainer(out: Path, callback: GrokfastTrainerCallback | None, **overrides) -> transformers.Trainer:
    settings = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=4,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return transformers.Trainer(
        model=tiny_gpt2(),
        args=transformers.TrainingArguments(**settings),
        train_dataset=TokenData(),
        callbacks=[callback] if callback is not None else [],
    )


def weights(trainer: transformers.Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_from_checkpoint_is_bit_identical_to_the_uninterrupted_run(tmp_path, kind):
    straight = make_trainer(tmp_path / "a", GrokfastTrainerCallback(**KINDS[kind]))
    straight.train()
    assert straight.callback_handler.callbacks  # the run really filtered every step
    callback = next(c for c in straight.callback_handler.callbacks if isinstance(c, GrokfastTrainerCallback))
    assert callback.handle.filter.steps == 8

    resumed_callback = GrokfastTrainerCallback(**KINDS[kind])
    resumed = make_trainer(tmp_path / "b", resumed_callback)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed_callback.handle.filter.steps == 8  # 4 restored + 4 new, not a fresh filter
    assert max_difference(weights(resumed), weights(straight)) == 0.0


def test_the_filter_changes_the_training(tmp_path):
    plain = make_trainer(tmp_path / "plain", None)
    plain.train()
    filtered = make_trainer(tmp_path / "ema", GrokfastTrainerCallback(filter="ema", lamb=2.0))
    filtered.train()
    assert max_difference(weights(plain), weights(filtered)) > 1e-4


def test_gradient_accumulation_filters_once_per_optimizer_step(tmp_path):
    callback = GrokfastTrainerCallback(filter="ema", alpha=0.8)
    trainer = make_trainer(tmp_path, callback, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    assert trainer.state.global_step == 8
    assert callback.handle.filter.steps == 8  # not 16: one filter step per optimizer step


def test_the_filter_sees_the_clipped_gradient_and_its_output_is_not_clipped_again(tmp_path):
    stepped: list[float] = []

    class Probe(transformers.TrainerCallback):
        """Records the norm of the gradients the optimizer steps with (a step pre-hook after Grokfast's)."""

        def on_train_begin(self, args, state, control, **kwargs):
            optimizer = callback.handle.optimizer

            def record(*_):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                stepped.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            optimizer.register_step_pre_hook(record)

    callback = GrokfastTrainerCallback(filter="ema", alpha=0.5, lamb=4.0)
    trainer = make_trainer(tmp_path, None, max_grad_norm=0.01, save_strategy="no", logging_steps=1)
    trainer.add_callback(callback)
    trainer.add_callback(Probe())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # HF logs the norm before clipping; the filter received the clipped gradient (norm 0.01) ...
    assert all(entry["grad_norm"] > 0.1 for entry in logs)
    assert [entry["grokfast/grad_norm"] for entry in logs] == pytest.approx([0.01] * 8, rel=1e-4)
    # ... and the optimizer stepped with the amplified one, not clipped again
    assert len(stepped) == 8 and min(stepped) > 0.015


def test_bf16_autocast_on_cpu_trains_and_resumes_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a", GrokfastTrainerCallback(filter="ema", alpha=0.8), bf16=True)
    straight.train()
    resumed = make_trainer(tmp_path / "b", GrokfastTrainerCallback(filter="ema", alpha=0.8), bf16=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
    assert max_difference(weights(resumed), weights(straight)) == 0.0


def test_the_filter_numbers_reach_the_trainer_logs_and_the_report_to_integrations(tmp_path):
    received: list[dict] = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(dict(logs))

    callback = GrokfastTrainerCallback(filter="ema", alpha=0.9, lamb=2.0)
    trainer = make_trainer(tmp_path, None, save_strategy="no", report_to="tensorboard")
    trainer.callback_handler.callbacks.insert(1, Reporter())  # a reporter ahead of the user's callbacks
    trainer.add_callback(callback)
    trainer.train()
    train_logs = [entry for entry in received if "loss" in entry]
    assert len(train_logs) == 4  # logging_steps=2 over 8 steps
    for entry in train_logs:
        assert entry["grokfast/lamb"] == 2.0 and entry["grokfast/alpha"] == 0.9
        assert math.isfinite(entry["grokfast/slow_norm"]) and entry["grokfast/grad_norm"] > 0
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("grokfast/slow_to_grad_ratio" in entry for entry in history)
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and b"grokfast/slow_norm" in b"".join(path.read_bytes() for path in events)


def test_bad_arguments_fail_at_construction_naming_the_argument():
    with pytest.raises(ValueError, match="`alpha` must be a number in"):
        GrokfastTrainerCallback(alpha=1.5)
    with pytest.raises(ValueError, match="`window_size`"):
        GrokfastTrainerCallback(filter="ma", window_size=0)
    with pytest.raises(ValueError, match="exclude"):
        GrokfastTrainerCallback(exclude="(")
    assert GrokfastTrainerCallback.from_speedup(100).alpha == pytest.approx(0.1 ** (1 / 100))


def test_exclude_and_start_step_select_what_is_filtered(tmp_path):
    callback = GrokfastTrainerCallback(filter="ema", exclude=r"\.bias$|ln_", start_step=3)
    trainer = make_trainer(tmp_path, callback, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "nothing to filter" warning on any step
        trainer.train()
    names = set(callback.handle.filter.states)
    assert names and not any(n.endswith(".bias") or "ln_" in n for n in names)


def _bfloat16_trainer(out: Path, *, given_optimizer: bool) -> transformers.Trainer:
    """A GPT-2 whose parameters are bfloat16 (as ``from_pretrained(..., dtype=torch.bfloat16)`` gives)."""
    model = tiny_gpt2().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2) if given_optimizer else None
    trainer = make_trainer(out, GrokfastTrainerCallback(filter="ema", alpha=0.8, lamb=2.0))
    return transformers.Trainer(
        model=model,
        args=trainer.args,
        train_dataset=TokenData(),
        callbacks=[GrokfastTrainerCallback(filter="ema", alpha=0.8, lamb=2.0)],
        optimizers=(optimizer, None),
    )


def test_bfloat16_parameters_resume_exactly_when_the_trainer_is_given_the_optimizer(tmp_path):
    straight = _bfloat16_trainer(tmp_path / "a", given_optimizer=True)
    straight.train()
    resumed = _bfloat16_trainer(tmp_path / "b", given_optimizer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # attached before the load: nothing was rounded
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, GrokfastTrainerCallback))
    assert {s.ema.dtype for s in callback.handle.filter.states.values()} == {torch.float32}
    assert max_difference(weights(resumed), weights(straight)) == 0.0


def test_bfloat16_parameters_of_a_trainer_made_optimizer_warn_how_to_resume_exactly(tmp_path):
    _bfloat16_trainer(tmp_path / "a", given_optimizer=False).train()
    resumed = _bfloat16_trainer(tmp_path / "b", given_optimizer=False)
    with pytest.warns(
        UserWarning, match=r"rounded state\. To resume exactly, .* `Trainer\(optimizers=\(optimizer, None\)\)`"
    ):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))


def test_a_second_trainer_filters_the_same_model_once_the_first_has_finished(tmp_path):
    first = make_trainer(tmp_path / "a", GrokfastTrainerCallback(filter="ema"), save_strategy="no", max_steps=2)
    first.train()
    callback = GrokfastTrainerCallback(filter="ma", window_size=2)
    second = transformers.Trainer(model=first.model, args=first.args, train_dataset=TokenData(), callbacks=[callback])
    second.train()  # `first` is still alive, and its optimizer still carries its filter
    assert callback.handle.filter.steps == 2


def test_train_called_again_on_the_same_trainer_continues_the_filter_with_its_optimizer(tmp_path):
    callback = GrokfastTrainerCallback(filter="ema")
    trainer = make_trainer(tmp_path, callback, save_strategy="no", max_steps=2)
    trainer.train()
    handle = callback.handle
    trainer.train()  # the Trainer keeps its optimizer (and its moments), so the filter goes on too
    assert callback.handle is handle and handle.filter.steps == 4


@pytest.mark.timeout(180)
def test_two_ddp_processes_hold_identical_filter_state(tmp_path):
    """A real 2-process (gloo) Trainer run: every rank filters the same all-reduced gradients."""
    import subprocess
    import sys

    worker = Path(__file__).with_name("hf_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*command, str(worker), str(tmp_path)], check=True, capture_output=True, timeout=170)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["filter"].keys() == ranks[1]["filter"].keys() and ranks[0]["filter"]
    for name, entry in ranks[0]["filter"].items():
        for key, value in entry.items():
            other = ranks[1]["filter"][name][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (name, key)
    assert all(torch.equal(w, ranks[1]["weights"][n]) for n, w in ranks[0]["weights"].items())


def test_the_tied_embedding_and_head_have_one_filter_state_and_exclude_takes_both(tmp_path):
    callback = GrokfastTrainerCallback(filter="ema")
    trainer = make_trainer(tmp_path / "a", callback, save_strategy="no", max_steps=1)
    trainer.train()
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight  # GPT-2 ties them
    names = set(callback.handle.filter.states)
    assert "transformer.wte.weight" in names and not any(n.startswith("lm_head") for n in names)
    excluding = GrokfastTrainerCallback(filter="ema", exclude=r"\.wte\.")
    make_trainer(tmp_path / "b", excluding, save_strategy="no", max_steps=1).train()
    assert set(excluding.handle.filter.states) == names - {"transformer.wte.weight"}


def test_resuming_with_another_filter_kind_is_a_clear_error(tmp_path):
    make_trainer(tmp_path / "a", GrokfastTrainerCallback(filter="ema"), max_steps=4).train()
    resumed = make_trainer(tmp_path / "b", GrokfastTrainerCallback(filter="ma", window_size=3))
    with pytest.raises(ValueError, match="was made by filter='ema'; this filter is 'ma'"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))


def test_the_callback_is_importable_from_its_short_paths():
    import lightning_grokfast
    from lightning_grokfast.hf import GrokfastTrainerCallback as Short

    assert Short is GrokfastTrainerCallback is lightning_grokfast.GrokfastTrainerCallback
