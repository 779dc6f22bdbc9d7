"""The built-in tasks: data sizes, disjoint splits, determinism, the reference model, and that they grok."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_grokfast.tasks import (
    DigitsDataModule,
    EpochPermutationSampler,
    GrokTransformer,
    MLPClassifier,
    ModularArithmeticDataModule,
    SparseParityDataModule,
    make_modular_dataset,
    make_sparse_parity_dataset,
)
from lightning_grokfast.tasks.digits import load_digits_tensors
from lightning_grokfast.tasks.losses import stablemax_cross_entropy
from tests.helpers import trainer


def _rows(dataset: torch.utils.data.TensorDataset) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in dataset.tensors[0]}


# ---------------------------------------------------------------------------------------------------- data
def test_sparse_parity_has_the_requested_sizes_and_labels_the_relevant_bits() -> None:
    data = SparseParityDataModule(num_bits=12, k=3, num_train=100, num_val=300, seed=4)
    inputs, targets = data.train_set.tensors
    assert inputs.shape == (100, 12) and len(data.val_set) == 300
    assert set(inputs.unique().tolist()) == {-1.0, 1.0}
    expected = (inputs[:, data.relevant_bits] < 0).sum(1) % 2
    assert torch.equal(targets, expected) and len(data.relevant_bits) == 3
    assert (data.num_inputs, data.num_classes) == (12, 2)


def test_sparse_parity_split_is_disjoint_and_deterministic_by_seed() -> None:
    a, b, c = (SparseParityDataModule(num_bits=10, num_train=200, num_val=500, seed=s) for s in (1, 1, 2))
    assert not _rows(a.train_set) & _rows(a.val_set)
    assert len(_rows(a.train_set) | _rows(a.val_set)) == 700  # all distinct
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])


def test_sparse_parity_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="`k` must be"):
        make_sparse_parity_dataset(num_bits=4, k=5)
    with pytest.raises(ValueError, match="`num_examples` must be at most"):
        make_sparse_parity_dataset(num_bits=4, k=2, num_examples=17)
    with pytest.raises(ValueError, match="`num_train` must be"):
        SparseParityDataModule(num_train=0)


def test_digits_split_sizes_disjoint_and_deterministic_by_seed() -> None:
    a, b, c = (DigitsDataModule(num_train=300, seed=s) for s in (0, 0, 1))
    assert len(a.train_set) == 300 and len(a.val_set) == 1797 - 300
    assert a.train_set.tensors[0].shape[1] == a.num_inputs == 64 and a.num_classes == 10
    assert float(a.train_set.tensors[0].max()) <= 1.0
    split = torch.cat([a.train_set.tensors[0], a.val_set.tensors[0]])
    assert Counter(map(tuple, split.tolist())) == Counter(map(tuple, load_digits_tensors()[0].tolist()))  # a partition
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    with pytest.raises(ValueError, match="`num_train` must be"):
        DigitsDataModule(num_train=1797)


def test_modular_split_is_disjoint_and_covers_every_equation() -> None:
    data = ModularArithmeticDataModule(p=11, seed=3)
    assert len(data.train_set) + len(data.val_set) == 11 * 10
    assert not _rows(data.train_set) & _rows(data.val_set)


def test_modular_tokens_are_the_paper_codes() -> None:
    inputs, targets = make_modular_dataset("*", 7)
    assert inputs.shape == (7 * 6, 4)
    assert (inputs[:, 1] == 8).all() and (inputs[:, 3] == 7).all()  # operator p + 1, equals p
    torch.testing.assert_close(targets, inputs[:, 0] * inputs[:, 2] % 7)


def test_modular_paper_order_draws_split_and_batches_as_the_paper_code() -> None:
    # The paper's script: seed torch's global generator, build the model, draw the split, then one permutation
    # of the train half per epoch, all from that generator.
    torch.manual_seed(3)
    GrokTransformer(num_tokens=99)
    split = torch.randperm(97 * 96)
    epochs = [torch.randperm(4656) for _ in range(2)]
    inputs, targets = make_modular_dataset("*", 97)
    train_inputs = inputs[split[:4656]]

    data = ModularArithmeticDataModule(seed=3)
    torch.testing.assert_close(data.train_set.tensors[0], train_inputs)
    torch.testing.assert_close(data.val_set.tensors[1], targets[split[4656:]])
    loader = data.train_dataloader()
    for permutation in epochs:  # each pass over the loader is one epoch
        train_inputs = train_inputs[permutation]  # the paper reassigns its train data: the orders compose
        batches = [batch for batch, _ in loader]
        assert [len(b) for b in batches] == [512] * 9 + [48]  # the paper's last batch too
        torch.testing.assert_close(torch.cat(batches), train_inputs)


def test_modular_datamodule_leaves_the_global_generator_to_the_model() -> None:
    torch.manual_seed(5)
    expected = GrokTransformer(num_tokens=99).state_dict()
    torch.manual_seed(5)
    ModularArithmeticDataModule(seed=5)
    for name, tensor in GrokTransformer(num_tokens=99).state_dict().items():
        torch.testing.assert_close(tensor, expected[name])


class _BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:  # type: ignore[no-untyped-def]
        self.batches.append((trainer.global_step, batch[0].clone()))


def _fit_small_modular(  # type: ignore[no-untyped-def]
    max_steps: int, val_every: float, ckpt_path: Path | None = None, checkpoint: dict[str, Any] | None = None
):
    pl.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(p=23, batch_size=64)  # 253 train equations: 4 batches an epoch, the last 61
    model = GrokTransformer(num_tokens=data.num_tokens, dim=16, num_heads=2, num_layers=1)
    recorder = _BatchRecorder()
    callbacks: list[pl.Callback] = [recorder]
    if checkpoint is not None:
        callbacks.append(ModelCheckpoint(save_top_k=-1, **checkpoint))
    fit = trainer(
        max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(checkpoint), val_check_interval=val_every
    )
    fit.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return recorder.batches, model


@pytest.mark.parametrize(
    ("checkpoint", "val_every", "step"),
    [
        ({"every_n_train_steps": 6}, 1.0, 6),  # mid-epoch, after a training batch
        ({"every_n_train_steps": 8}, 1.0, 8),  # after an epoch's last batch
        ({}, 1.0, 8),  # the default: after the validation at the end of each epoch
        ({}, 3, 7),  # after a validation in the middle of an epoch
    ],
    ids=["mid-epoch", "last-batch", "epoch-end", "mid-epoch-validation"],
)
def test_a_resumed_modular_run_trains_on_the_uninterrupted_runs_batches(
    checkpoint: dict[str, Any], val_every: float, step: int, tmp_path: Path
) -> None:
    uninterrupted, expected = _fit_small_modular(14, val_every)
    _fit_small_modular(9, val_every, checkpoint={"dirpath": tmp_path, **checkpoint})
    (path,) = tmp_path.glob(f"*-step={step}.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
        resumed, model = _fit_small_modular(14, val_every, ckpt_path=path)
    assert [s for s, _ in resumed] == list(range(step, 14))
    for (s, mine), (_, theirs) in zip(resumed, uninterrupted[step:]):
        torch.testing.assert_close(mine, theirs, msg=f"step {s}")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[key], rtol=0, atol=0, msg=key)


def test_epoch_permutation_sampler_starts_where_a_run_left_off() -> None:
    full = EpochPermutationSampler(10, torch.Generator().manual_seed(1))
    epochs = [list(full) for _ in range(3)]
    resumed = EpochPermutationSampler(10, torch.Generator().manual_seed(1), start_epoch=1, skip=4)
    assert len(resumed) == 10 and list(resumed) == epochs[1][4:] and list(resumed) == epochs[2]
    with pytest.raises(ValueError, match="`skip`"):
        EpochPermutationSampler(10, torch.Generator(), skip=11)
    with pytest.raises(ValueError, match="`start_epoch`"):
        EpochPermutationSampler(10, torch.Generator(), start_epoch=-1)


def test_modular_own_order_is_the_earlier_seeded_split() -> None:
    data = ModularArithmeticDataModule(p=11, seed=3, paper_order=False)
    inputs, _ = make_modular_dataset("*", 11)
    order = torch.randperm(110, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(data.train_set.tensors[0], inputs[order[:55]])
    with pytest.raises(ValueError, match="`paper_order`"):
        ModularArithmeticDataModule(paper_order="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- models
def test_transformer_is_pre_norm_with_a_bias_free_head_over_all_tokens_by_default() -> None:
    model = GrokTransformer(num_tokens=13, dim=16, num_heads=2, num_layers=1)
    assert model.head.out_features == 13 and model.head.bias is None
    assert model.blocks[0].norm_first
    assert model(torch.randint(0, 13, (5, 4))).shape == (5, 13)


def test_pre_norm_block_normalises_before_attention_and_mlp() -> None:
    torch.manual_seed(0)
    model = GrokTransformer(num_tokens=13, dim=16, num_heads=2, num_layers=1)
    block, x = model.blocks[0], torch.randn(3, 4, 16)
    mask = model.causal_mask[:4, :4]
    h = block.attention_norm(x)
    h = h + block.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
    expected = h + block.mlp(block.mlp_norm(h))
    torch.testing.assert_close(block(x, mask), expected)


def test_transformer_draws_the_initial_weights_of_the_papers_model() -> None:
    # The paper's model, written out in its construction order: token and position (5) embeddings; per block
    # ln_1, ln_2, attention, MLP; final LayerNorm; bias-free head. Same seed, same weights.
    torch.manual_seed(7)
    tokens, positions = nn.Embedding(99, 128), nn.Embedding(5, 128)
    blocks = [
        (nn.LayerNorm(128), nn.LayerNorm(128), nn.MultiheadAttention(128, 4), nn.Linear(128, 512), nn.Linear(512, 128))
        for _ in range(2)
    ]
    head = (nn.LayerNorm(128), nn.Linear(128, 99, bias=False))[1]
    torch.manual_seed(7)
    model = GrokTransformer(num_tokens=99)
    torch.testing.assert_close(model.token_embedding.weight, tokens.weight)
    torch.testing.assert_close(model.position_embedding.weight, positions.weight)
    for ours, (_, _, attention, up, down) in zip(model.blocks, blocks, strict=True):
        torch.testing.assert_close(ours.attention.in_proj_weight, attention.in_proj_weight)
        torch.testing.assert_close(ours.attention.out_proj.weight, attention.out_proj.weight)
        torch.testing.assert_close(ours.mlp[0].weight, up.weight)
        torch.testing.assert_close(ours.mlp[2].bias, down.bias)
    torch.testing.assert_close(model.head.weight, head.weight)


def test_post_norm_option_gives_the_earlier_model() -> None:
    model = GrokTransformer(num_tokens=13, num_classes=11, dim=16, num_heads=2, norm_first=False, head_bias=True)
    assert not model.blocks[0].norm_first and model.head.bias is not None and model.head.out_features == 11
    torch.manual_seed(0)
    block, x = model.blocks[0], torch.randn(3, 4, 16)
    mask = model.causal_mask[:4, :4]
    h = block.attention_norm(x + block.attention(x, x, x, attn_mask=mask, need_weights=False)[0])
    torch.testing.assert_close(block(x, mask), block.mlp_norm(h + block.mlp(h)))


def test_mlp_scales_its_initialisation() -> None:
    torch.manual_seed(0)
    plain = MLPClassifier(num_inputs=8, num_classes=3, hidden=16)
    torch.manual_seed(0)
    scaled = MLPClassifier(num_inputs=8, num_classes=3, hidden=16, init_scale=4.0)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, 4 * p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "hinge"}, "`loss` must be one of"),
        ({"optimizer": "sgd"}, "`optimizer` must be one of"),
        ({"weight_decay": -1.0}, "`weight_decay` must be"),
        ({"init_scale": 0.0}, "`init_scale` must be"),
        ({"depth": 0}, "`depth` must be"),
    ],
)
def test_models_reject_bad_arguments_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MLPClassifier(**kwargs)


def test_loss_option_selects_stablemax() -> None:
    assert GrokTransformer(loss="stablemax").loss_fn is stablemax_cross_entropy
    assert MLPClassifier().loss_fn is nn.functional.cross_entropy


# ---------------------------------------------------------------------------------------------------- they grok
def _accuracies(model: pl.LightningModule, data: pl.LightningDataModule, steps: int) -> tuple[float, float]:
    """Train ``steps`` full-batch steps with the Trainer; return (train accuracy, validation accuracy)."""
    pl.seed_everything(0, verbose=False)
    trainer(max_steps=steps, limit_val_batches=0).fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():
        (train_x, train_y), (val_x, val_y) = data.train_set.tensors, data.val_set.tensors
        return (
            float((model(train_x).argmax(-1) == train_y).float().mean()),
            float((model(val_x).argmax(-1) == val_y).float().mean()),
        )


def test_sparse_parity_is_memorised_long_before_it_generalises() -> None:
    torch.manual_seed(0)
    model = MLPClassifier(num_inputs=30, num_classes=2, hidden=256, optimizer="adamw", weight_decay=1.0)
    train, val = _accuracies(model, SparseParityDataModule(num_train=500, batch_size=500), steps=250)
    assert train == 1.0 and val < 0.75


def test_digits_with_a_large_init_are_memorised_before_they_generalise() -> None:
    torch.manual_seed(0)
    model = MLPClassifier(64, 10, hidden=200, depth=2, init_scale=16.0, optimizer="adamw", weight_decay=1.0)
    train, val = _accuracies(model, DigitsDataModule(num_train=500), steps=200)
    assert train >= 0.99 and val < 0.85
