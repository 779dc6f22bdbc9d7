"""GrokfastCallback under ModelParallelStrategy + FSDP2 ``fully_shard``: real 2-process CPU runs (gloo).

The filter state is written into Lightning's distributed checkpoint sharded like the parameters, read back by each
rank for its own shard, and resharded by torch.distributed.checkpoint when the number of processes changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

WORKER = Path(__file__).with_name("fsdp2_worker.py")
KINDS = ["ema", "ma", "ema+ma"]

pytestmark = pytest.mark.timeout(300)


def launch(
    out: Path, kind: str, devices: int, epochs: int, ckpt: Path | None = None, layout: str = "fsdp2"
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(WORKER), str(out), kind, str(devices), str(epochs)] + ([str(ckpt)] if ckpt else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning", "WORKER_LAYOUT": layout}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)


def run(out: Path, kind: str, devices: int, epochs: int, ckpt: Path | None = None, layout: str = "fsdp2") -> list[dict]:
    result = launch(out, kind, devices, epochs, ckpt, layout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def full_checkpoint(path: Path, tmp: Path) -> dict:
    target = tmp / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two epochs straight on 2 processes per filter kind (a checkpoint at each epoch end)."""
    dirs = {}
    for kind in KINDS:
        dirs[kind] = tmp_path_factory.mktemp(f"straight-{kind.replace('+', '-')}")
        reports = run(dirs[kind], kind, devices=2, epochs=2)
        for report in reports:
            assert report["gathers"] == {"full_tensor": 0, "redistribute": 0}  # no rank gathers the state
    return dirs


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_the_epoch_checkpoint_is_bit_identical_to_training_straight(straight, tmp_path, kind):
    reports = run(tmp_path, kind, devices=2, epochs=2, ckpt=straight[kind] / "epoch=0.ckpt")
    assert [r["steps"] for r in reports] == [12, 12]
    assert all(r["gathers"] == {"full_tensor": 0, "redistribute": 0} for r in reports)
    expected = torch.load(straight[kind] / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


def test_the_checkpoint_holds_the_filter_state_sharded_like_the_parameters(straight, tmp_path):
    full = full_checkpoint(straight["ema+ma"] / "epoch=1.ckpt", tmp_path)
    state = full["optimizer_0"]["state"]["body.weight"]
    assert state["grokfast_ema"].shape == (5, 4)
    assert state["grokfast_ma_history"].shape == (3, 5, 4)
    assert state["grokfast_ma_sum"].dtype == torch.float32
    assert state["exp_avg"].shape == (5, 4)  # beside Adam's own state
    # each rank holds only its shard: rank 0 rows 0-2, rank 1 rows 3-4 of body.weight
    shards = [torch.load(straight["ema+ma"] / f"rank{r}_state.pt", weights_only=False) for r in range(2)]
    glued = torch.cat([shards[0]["body.weight"]["ema"], shards[1]["body.weight"]["ema"]])
    assert torch.equal(glued, state["grokfast_ema"])


def test_state_bytes_per_rank_are_the_shards_share(straight):
    for rank in range(2):
        report = json.loads((straight["ema"] / f"rank{rank}.json").read_text())
        assert report["state_bytes"] == 4 * sum(report["local_numel"].values())  # float32 EMA of the shard only


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_whole_state(straight, tmp_path):
    run(tmp_path, "ema+ma", devices=1, epochs=1, ckpt=straight["ema+ma"] / "epoch=0.ckpt")
    full = full_checkpoint(straight["ema+ma"] / "epoch=0.ckpt", tmp_path)
    loaded = torch.load(tmp_path / "rank0_state.pt", weights_only=False)
    for name, entry in loaded.items():
        saved = full["optimizer_0"]["state"][name]
        for key in ("ema", "ma_history", "ma_sum"):
            assert torch.equal(entry[key], saved[f"grokfast_{key}"]), (name, key)
        assert entry["ma_count"] == saved["grokfast_ma_count"] == 3


def test_a_one_process_checkpoint_resumes_on_two_processes_each_with_its_shard(tmp_path):
    run(tmp_path / "one", "ema", devices=1, epochs=1)
    run(tmp_path / "two", "ema", devices=2, epochs=1, ckpt=tmp_path / "one" / "epoch=0.ckpt")
    saved = torch.load(tmp_path / "one" / "rank0_state.pt", weights_only=False)
    shards = [torch.load(tmp_path / "two" / f"rank{r}_state.pt", weights_only=False) for r in range(2)]
    for name, entry in saved.items():
        glued = torch.cat([shards[0][name]["ema"], shards[1][name]["ema"]])
        assert torch.equal(glued, entry["ema"]), name


def test_resuming_with_another_filter_fails_naming_both_filters(straight, tmp_path):
    result = launch(tmp_path, "ma", devices=2, epochs=2, ckpt=straight["ema"] / "epoch=0.ckpt")
    assert result.returncode != 0
    assert "holds Grokfast state for 'body.weight' made by filter='ema'; this filter is 'ma'" in result.stderr
    assert "Missing key" not in result.stderr  # caught before torch.distributed.checkpoint's own error


def test_resuming_with_another_window_fails_naming_both_windows(straight, tmp_path):
    result = launch(tmp_path, "ma:5", devices=2, epochs=2, ckpt=straight["ma"] / "epoch=0.ckpt")
    assert result.returncode != 0
    assert "with window_size=3; this filter has window_size=5" in result.stderr


def test_a_checkpoint_without_filter_state_resumes_with_a_warning_and_a_fresh_filter(tmp_path):
    assert launch(tmp_path / "off", "off", devices=2, epochs=1).returncode == 0
    result = launch(tmp_path / "on", "ema", devices=2, epochs=2, ckpt=tmp_path / "off" / "epoch=0.ckpt")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "holds no Grokfast state for ['body.weight', 'body.bias', 'head.weight', 'head.bias']" in result.stderr
    reports = [json.loads((tmp_path / "on" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in reports] == [6, 6]  # the filter ran the second epoch only, from a fresh state


def test_tensor_parallel_resume_is_bit_identical_with_state_sharded_on_each_placement(tmp_path):
    """Column-wise ``Shard(0)``, row-wise ``Shard(1)`` (its window on dim 2) and a ``Replicate`` bias."""
    run(tmp_path / "straight", "ema+ma", devices=2, epochs=2, layout="tp")  # (the TP layers themselves redistribute)
    run(tmp_path / "resumed", "ema+ma", devices=2, epochs=2, ckpt=tmp_path / "straight" / "epoch=0.ckpt", layout="tp")
    expected = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    full = full_checkpoint(tmp_path / "straight" / "epoch=1.ckpt", tmp_path)["optimizer_0"]["state"]
    shards = [torch.load(tmp_path / "straight" / f"rank{r}_state.pt", weights_only=False) for r in range(2)]
    assert full["head.weight"]["grokfast_ma_history"].shape == (3, 2, 6)
    glued = torch.cat([shards[0]["head.weight"]["ma_history"], shards[1]["head.weight"]["ma_history"]], dim=2)
    assert torch.equal(glued, full["head.weight"]["grokfast_ma_history"])
    assert torch.equal(shards[0]["head.bias"]["ema"], shards[1]["head.bias"]["ema"])  # replicated
    assert torch.equal(shards[0]["head.bias"]["ema"], full["head.bias"]["grokfast_ema"])
    # and the split run filters what an unsplit one does (up to the order of the row-wise partial sums)
    run(tmp_path / "one", "ema+ma", devices=1, epochs=2, layout="tp")
    unsplit = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    for name, value in unsplit.items():
        torch.testing.assert_close(expected[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_sharded_benchmark_runs_and_finds_each_ranks_state_is_its_shards_share(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded_dcp.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--kinds", "ema+ma", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((tmp_path / "sharded_dcp_smoke.json").read_text())
    for kind in record["results"]:
        for rank in kind["ranks"]:
            assert rank["state_bytes"] == rank["expected_state_bytes"] > 0
            assert 2 * rank["local_numel"] == rank["total_numel"]
            assert rank["gathers_during_checkpointing"] == {"full_tensor": 0, "redistribute": 0}
            assert rank["checkpoint_bytes"]["with"] > rank["checkpoint_bytes"]["without"]
