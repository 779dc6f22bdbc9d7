"""GrokfastCallback under ModelParallelStrategy (FSDP2 ``fully_shard``, tensor parallel): real CPU runs (gloo).

The filter state is written into Lightning's distributed checkpoint sharded like the parameters, read back by each
rank for its own shard, and resharded by torch.distributed.checkpoint when the number of processes changes. All
runs are made once per module, in three process starts (1 process, 2 processes, 1 process: Lightning runs several
fits in the same processes), and the tests read what they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

WORKER = Path(__file__).with_name("fsdp2_worker.py")
KINDS = ["ema", "ma", "ema+ma"]

pytestmark = pytest.mark.timeout(400)


def job(out: Path, kind: str, devices: int, epochs: int, ckpt: Path | None = None, **extra: Any) -> dict:
    return {"out": str(out), "kind": kind, "devices": devices, "epochs": epochs, "ckpt": ckpt and str(ckpt), **extra}


def launch(jobs: list[dict], path: Path) -> None:
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}
    result = subprocess.run(
        [sys.executable, str(WORKER), str(path)], capture_output=True, text=True, env=env, timeout=360
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def reports(out: Path, devices: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def shards(out: Path, devices: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{r}_state.pt", weights_only=False) for r in range(devices)]


def full_checkpoint(path: Path, tmp: Path) -> dict:
    target = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=False)


def slug(kind: str) -> str:
    return kind.replace("+", "-").replace(":", "-")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp2")

    def ckpt(name: str) -> Path:  # the checkpoint ModelCheckpoint wrote at the end of the first epoch
        return root / name / "epoch=0.ckpt"

    one = [job(root / "one-ema", "ema", 1, 1), job(root / "tp-one", "ema+ma", 1, 2, layout="tp")]
    two = [
        *(job(root / f"straight-{slug(k)}", k, 2, 2) for k in KINDS),
        *(job(root / f"resumed-{slug(k)}", k, 2, 2, ckpt(f"straight-{slug(k)}")) for k in KINDS),
        job(root / "tp-straight", "ema+ma", 2, 2, layout="tp"),
        job(root / "tp-resumed", "ema+ma", 2, 2, ckpt("tp-straight"), layout="tp"),
        job(root / "two-from-one", "ema", 2, 1, ckpt("one-ema")),
        job(root / "off", "off", 2, 1),
        job(root / "on-from-off", "ema", 2, 2, ckpt("off")),
        *(job(root / f"fabric-{k}", k, 2, 6, save_at=3, start_step=4, layout="fabric") for k in ("ema", "ma")),
        *(
            job(
                root / f"fabric-{k}-resumed", k, 2, 6, root / f"fabric-{k}" / "step.ckpt", start_step=4, layout="fabric"
            )
            for k in ("ema", "ma")
        ),
    ]
    back = [
        job(root / "one-from-two", "ema+ma", 1, 1, ckpt("straight-ema-ma")),
        job(root / "other-filter", "ma", 1, 2, ckpt("straight-ema"), expect_error=True),
        job(root / "other-window", "ma:5", 1, 2, ckpt("straight-ma"), expect_error=True),
    ]
    for i, jobs in enumerate((one, two, back)):
        launch(jobs, root / f"jobs{i}.json")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_the_epoch_checkpoint_is_bit_identical_to_training_straight(runs, kind):
    straight, resumed = runs / f"straight-{slug(kind)}", runs / f"resumed-{slug(kind)}"
    assert [r["steps"] for r in reports(resumed)] == [12, 12]
    for report in reports(straight) + reports(resumed):
        assert report["gathers"] == {"full_tensor": 0, "redistribute": 0}  # no rank gathers the state
    expected = torch.load(straight / "final.pt", weights_only=True)
    got = torch.load(resumed / "final.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_the_checkpoint_holds_the_filter_state_sharded_like_the_parameters(runs, tmp_path):
    full = full_checkpoint(runs / "straight-ema-ma" / "epoch=1.ckpt", tmp_path)
    state = full["optimizer_0"]["state"]["body.weight"]
    assert state["grokfast_ema"].shape == (5, 4)
    assert state["grokfast_ma_history"].shape == (3, 5, 4)
    assert state["grokfast_ma_sum"].dtype == torch.float32
    assert state["exp_avg"].shape == (5, 4)  # beside Adam's own state
    # each rank holds only its shard: rank 0 rows 0-2, rank 1 rows 3-4 of body.weight
    parts = shards(runs / "straight-ema-ma")
    glued = torch.cat([parts[0]["body.weight"]["ema"], parts[1]["body.weight"]["ema"]])
    assert torch.equal(glued, state["grokfast_ema"])


def test_state_bytes_per_rank_are_the_shards_share(runs):
    for report in reports(runs / "straight-ema"):
        assert report["state_bytes"] == 4 * sum(report["local_numel"].values())  # float32 EMA of the shard only


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_whole_state(runs, tmp_path):
    full = full_checkpoint(runs / "straight-ema-ma" / "epoch=0.ckpt", tmp_path)
    (loaded,) = shards(runs / "one-from-two", devices=1)
    for name, entry in loaded.items():
        saved = full["optimizer_0"]["state"][name]
        for key in ("ema", "ma_history", "ma_sum"):
            assert torch.equal(entry[key], saved[f"grokfast_{key}"]), (name, key)
        assert entry["ma_count"] == saved["grokfast_ma_count"] == 3


def test_a_one_process_checkpoint_resumes_on_two_processes_each_with_its_shard(runs):
    (saved,) = shards(runs / "one-ema", devices=1)
    parts = shards(runs / "two-from-one")
    for name, entry in saved.items():
        glued = torch.cat([parts[0][name]["ema"], parts[1][name]["ema"]])
        assert torch.equal(glued, entry["ema"]), name


def test_resuming_with_another_filter_fails_naming_both_filters(runs):
    error = (runs / "other-filter" / "error.txt").read_text()
    assert "holds Grokfast state for 'body.weight' made by filter='ema'; this filter is 'ma'" in error
    assert error.startswith("ValueError")  # caught before torch.distributed.checkpoint's "Missing key" error


def test_resuming_with_another_window_fails_naming_both_windows(runs):
    error = (runs / "other-window" / "error.txt").read_text()
    assert "with window_size=3; this filter has window_size=5" in error


def test_a_checkpoint_without_filter_state_resumes_with_a_warning_and_a_fresh_filter(runs):
    warned = (runs / "on-from-off" / "warnings.txt").read_text()
    assert "holds no Grokfast state for ['body.weight', 'body.bias', 'head.weight', 'head.bias']" in warned
    assert [r["steps"] for r in reports(runs / "on-from-off")] == [6, 6]  # the second epoch only, from fresh
    assert "no Grokfast state" not in (runs / "resumed-ema" / "warnings.txt").read_text()


def test_tensor_parallel_resume_is_bit_identical_with_state_sharded_on_each_placement(runs, tmp_path):
    """Column-wise ``Shard(0)``, row-wise ``Shard(1)`` (its window on dim 2) and a ``Replicate`` bias."""
    expected = torch.load(runs / "tp-straight" / "final.pt", weights_only=True)
    resumed = torch.load(runs / "tp-resumed" / "final.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    full = full_checkpoint(runs / "tp-straight" / "epoch=1.ckpt", tmp_path)["optimizer_0"]["state"]
    parts = shards(runs / "tp-straight")
    assert full["head.weight"]["grokfast_ma_history"].shape == (3, 2, 6)
    glued = torch.cat([parts[0]["head.weight"]["ma_history"], parts[1]["head.weight"]["ma_history"]], dim=2)
    assert torch.equal(glued, full["head.weight"]["grokfast_ma_history"])
    assert torch.equal(parts[0]["head.bias"]["ema"], parts[1]["head.bias"]["ema"])  # replicated
    assert torch.equal(parts[0]["head.bias"]["ema"], full["head.bias"]["grokfast_ema"])
    # and the split run filters what an unsplit one does (up to the order of the row-wise partial sums)
    unsplit = torch.load(runs / "tp-one" / "final.pt", weights_only=True)
    for name, value in unsplit.items():
        torch.testing.assert_close(expected[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_attach_grokfast_under_fabric_fsdp2_resumes_bit_identical_with_its_counters(runs, kind):
    """6 steps straight vs 3 + Fabric checkpoint + 3, with ``start_step=4`` (so the step counter must survive)."""
    assert [r["steps"] for r in reports(runs / f"fabric-{kind}-resumed")] == [6, 6]
    assert all(r["live_state_clean"] for r in reports(runs / f"fabric-{kind}-resumed"))  # no grokfast key leaked
    expected = torch.load(runs / f"fabric-{kind}" / "final.pt", weights_only=True)
    resumed = torch.load(runs / f"fabric-{kind}-resumed" / "final.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


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
