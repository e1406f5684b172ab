"""torchrun: data-parallel stages, end to end and caching passes, with gloo on this CPU.

Real `torchrun` jobs (`python -m torch.distributed.run ... -m cachetrain`) on a tiny synthetic run; what
needs NCCL and GPUs (`cachetrain.dist` picks NCCL on CUDA) is not exercised here. The unit tests at the
bottom check the sharding itself in this process: every sample once per epoch across ranks, whole chunks
per rank, the same number of steps on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cachetrain.cache.source import CacheSource
from cachetrain.config import DataConfig, LoaderConfig
from cachetrain.dist import Shard, rank_batches
from cachetrain.errors import CheckpointError, ConfigError
from cachetrain.train.checkpoint import check_world
from tests.conftest import cli, cli_in_process, make_store, sample_ids, synthetic_raw, write_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args: list[str], nproc: int = 2, max_restarts: int = 0, nodes: tuple[int, int] | None = None
                 ) -> list[str]:
    launch = ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts)]
    if nodes is None:
        launch += ["--standalone"]
    else:  # (nnodes, port): a c10d rendezvous on loopback, as on a cluster
        launch += ["--nnodes", str(nodes[0]), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{nodes[1]}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "cachetrain", *args]


def env(fault: str | None = None, fault_rank: int | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CACHETRAIN_FAULT")}
    e["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    if fault:
        e["CACHETRAIN_FAULT"] = fault
        if fault_rank is not None:
            e["CACHETRAIN_FAULT_RANK"] = str(fault_rank)
    return e


def torchrun(args: list[str], **kw) -> subprocess.CompletedProcess:
    fault, fault_rank = kw.pop("fault", None), kw.pop("fault_rank", None)
    return subprocess.run(torchrun_cmd(args, **kw), env=env(fault, fault_rank), capture_output=True, text=True,
                          timeout=300)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def raw(run_dir: Path, **train) -> dict:
    """2 stages; 320 training samples (64 held out) in batches of 32: 10 global steps per epoch, a checkpoint
    every 3; easy enough to learn in 3 epochs."""
    return synthetic_raw(run_dir, model={"stages": 2}, data={"val_samples": 64, "synthetic_noise": 30},
                         train={"epochs": 3, "lr": 0.1, "checkpoint_steps": 3, "probes": False, **train},
                         cache={"codec": "none"})


def weights(run_dir: Path, unit: str = "stages/stage_0") -> dict[str, np.ndarray]:
    ck = torch.load(run_dir / unit / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == ck["epochs"]
    return {f"{part}.{k}": v.numpy() for part in ("model", "head") if part in ck for k, v in ck[part].items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stage0(tmp_path_factory) -> Path:
    """Stage 0 trained in one process, not cached: the input of the caching tests."""
    d = tmp_path_factory.mktemp("stage0")
    cfg = write_config(d / "c.yaml", raw(d / "run"))
    ok(cli(["stage", "--config", str(cfg), "--no-cache"]))
    return d


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "run", dst / "run")
    return write_config(dst / "c.yaml", raw(dst / "run"))


@pytest.fixture(scope="module")
def one_process_cache(stage0, tmp_path_factory) -> Path:
    """Stage 0's cache written by one process: the reference the parallel passes must reproduce."""
    d = tmp_path_factory.mktemp("one")
    ok(cli(["cache", "--config", str(copy_run(stage0, d)), "--j", "0"]))
    return d / "run/cache/stage_0"


def test_a_cache_built_by_two_ranks_is_the_one_process_cache_byte_for_byte(stage0, one_process_cache, tmp_path):
    two = copy_run(stage0, tmp_path)
    r = ok(torchrun(["cache", "--config", str(two), "--j", "0"]))
    assert "computed 320 train, 64 val and 128 test samples" in r.stdout  # every rank's share, counted once
    for split in ("train", "val", "test"):
        b = tmp_path / "run/cache/stage_0" / f"{split}.zarr"
        assert zarr.open_group(str(b), mode="r").attrs["complete"] is True
        assert store_files(one_process_cache / f"{split}.zarr") == store_files(b), split
    assert ok(cli(["verify", "--config", str(two)])).returncode == 0


def test_a_two_rank_caching_pass_killed_midway_resumes_with_one_process(stage0, one_process_cache, tmp_path):
    cut = copy_run(stage0, tmp_path / "cut")
    r = torchrun(["cache", "--config", str(cut), "--j", "0"], fault="cache_chunk:4", fault_rank=1)
    assert r.returncode != 0
    train = tmp_path / "cut/run/cache/stage_0/train.zarr"
    assert zarr.open_group(str(train), mode="r").attrs["complete"] is False  # never taken for complete
    ok(cli(["cache", "--config", str(cut), "--j", "0"]))
    assert ok(cli(["verify", "--config", str(cut)])).returncode == 0
    assert store_files(train) == store_files(one_process_cache / "train.zarr")


@pytest.fixture(scope="module")
def two_rank_stage(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("two")
    ok(torchrun(["stage", "--config", str(write_config(d / "c.yaml", raw(d / "run"))), "--no-cache"]))
    return d / "run"


def test_a_two_rank_stage_trains_like_one_process(two_rank_stage, tmp_path):
    ok(cli(["stage", "--config", str(write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))), "--no-cache"]))
    one = [r for r in map(eval_row, (tmp_path / "run/stages/stage_0/metrics.jsonl").read_text().splitlines())]
    two = [r for r in map(eval_row, (two_rank_stage / "stages/stage_0/metrics.jsonl").read_text().splitlines())]
    assert len(one) == len(two) == 3
    # the same global batch (32: 16 per rank), another sample order and per-rank BN batches: close, not equal
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.2 * a["train_loss"], (a, b)
    assert one[-1]["test_acc"] >= 0.9 and two[-1]["test_acc"] >= 0.9, (one[-1], two[-1])



def eval_row(line: str) -> dict:
    return json.loads(line)


def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_the_stage_ends_bit_identical(two_rank_stage, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))
    # rank 1 dies after step 5 of epoch 1 (a checkpoint exists at step 3); torchrun restarts both ranks
    r = ok(torchrun(["stage", "--config", str(cfg), "--no-cache"], max_restarts=1, fault="train_step:5", fault_rank=1))
    assert "resuming at epoch 1, batch 3/10" in r.stdout
    assert same_bits(weights(tmp_path / "run"), weights(two_rank_stage))
    # the resumed epoch's running sums (every rank's, saved by rank 0 in the checkpoint) give the same row
    assert results(tmp_path / "run") == results(two_rank_stage)


def results(run_dir: Path) -> list[dict]:
    """Each epoch's row without its timings."""
    rows = [eval_row(x) for x in (run_dir / "stages/stage_0/metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "second" not in k and "per_s" not in k} for r in rows]


def test_two_nodes_on_loopback_train_the_two_rank_stage(two_rank_stage, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))
    port = free_port()
    cmd = torchrun_cmd(["stage", "--config", str(cfg), "--no-cache"], nproc=1, nodes=(2, port))
    nodes = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs
    assert same_bits(weights(tmp_path / "run"), weights(two_rank_stage))


def test_end_to_end_under_torchrun(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run", epochs=1))
    r = ok(torchrun(["e2e", "--config", str(cfg)]))
    assert "end-to-end test accuracy" in r.stdout
    rows = (tmp_path / "run/e2e/metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # rank 0 alone writes the baseline's files


def test_commands_that_read_a_run_refuse_torchrun(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group is joined
    r = cli_in_process(["status", "--config", str(cfg)])
    assert r.returncode == 2
    assert "error: torchrun: the status command runs in one process; expected it without torchrun" in r.stderr


@pytest.mark.parametrize("command", ["fork", "report"])
def test_fork_and_report_refuse_torchrun_before_touching_anything(stage0, tmp_path, monkeypatch, command):
    """N ranks of `fork` would race to link the same run; N of `report` to write the same files."""
    args = {"fork": ["--run", str(stage0 / "run"), "--at", "1", "--to", str(tmp_path / "forked")],
            "report": ["--run", str(stage0 / "run"), "--out", str(tmp_path / "report")]}[command]
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli_in_process([command, *args])
    assert r.returncode == 2
    assert r.stderr == (f"error: torchrun: the {command} command runs in one process; expected it without torchrun, "
                        f"which runs only train, stage, cache and e2e\n")
    assert not (tmp_path / "forked").exists() and not (tmp_path / "report").exists()


# -- the sharding, in this process ------------------------------------------------------------------

def test_rank_batches_cut_a_share_into_exactly_the_global_steps():
    parts = rank_batches(np.arange(37), 5)
    assert len(parts) == 5 and sorted(np.concatenate(parts).tolist()) == list(range(37))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ConfigError, match="holds 3 training samples, fewer than the 5 steps"):
        rank_batches(np.arange(3), 5)


def test_each_epoch_every_cached_sample_once_across_ranks_in_whole_chunks(tmp_path):
    train, test = (make_store(tmp_path / f"{s}.zarr", 203, chunk=8) for s in ("train", "test"))
    cfg = LoaderConfig(workers=0, window_chunks=2)
    cpu = torch.device("cpu")
    for world in (2, 3):
        sources = [CacheSource(train, test, cfg, seed=5, device=cpu, shard=Shard(r, world)) for r in range(world)]
        for epoch in (0, 1):
            ids = [[sample_ids([b]) for b in s.train_batches(epoch, 24, augment=False)] for s in sources]
            assert len({len(b) for b in ids}) == 1 and len(ids[0]) == -(-203 // 24)  # lockstep: same step count
            seen = np.concatenate([np.concatenate(b) for b in ids])
            assert sorted(seen.tolist()) == list(range(203))  # every sample exactly once
            chunks = [set(np.concatenate(b) // 8) for b in ids]
            assert all(not (chunks[a] & chunks[b]) for a in range(world) for b in range(a + 1, world))
            # resuming at batch 4 yields what the uninterrupted epoch yields from batch 4
            again = [sample_ids([b]) for b in sources[1].train_batches(epoch, 24, 4, augment=False)]
            assert all(np.array_equal(x, y) for x, y in zip(again, ids[1][4:], strict=True))


def test_each_epoch_every_image_once_across_ranks():
    from cachetrain.data.tensors import TensorImages

    n = 100
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 4, 4).contiguous()  # image i is i
    data = ((x, torch.zeros(n, dtype=torch.long)), (x[:10], torch.zeros(10, dtype=torch.long)))
    cfg = DataConfig(name="synthetic", val_samples=0)
    cpu = torch.device("cpu")
    images = [TensorImages("ids", *data, mean=0.0, std=1 / 255, num_classes=1, cfg=cfg, seed=3, device=cpu,
                           shard=Shard(r, 2)) for r in range(2)]
    for epoch in (0, 1):
        got = [[x[:, 0, 0, 0].round().long().numpy() for x, _ in s.train_batches(epoch, 16, augment=False)]
               for s in images]
        assert len(got[0]) == len(got[1]) == 7  # ceil(100 / 16) steps on each rank
        seen = np.concatenate([np.concatenate(g) for g in got])
        assert sorted(seen.tolist()) == list(range(n))  # every image exactly once across the two ranks
        again = [x[:, 0, 0, 0].round().long().numpy() for x, _ in images[1].train_batches(epoch, 16, 3, augment=False)]
        assert all(np.array_equal(a, b) for a, b in zip(again, got[1][3:], strict=True))


def test_a_mid_epoch_checkpoint_resumes_only_with_its_number_of_processes():
    check_world({"batch": 0, "world": 2}, 1, "stage 0")  # an epoch boundary: any number
    check_world({"batch": 3}, 1, "stage 0")
    with pytest.raises(CheckpointError, match="taken mid-epoch by 2 process"):
        check_world({"batch": 3, "world": 2}, 1, "stage 0")


def test_a_torchrun_job_on_a_run_in_use_is_refused_naming_the_holder(tmp_path):
    from cachetrain.train.rundir import RunDir

    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))
    held = RunDir(tmp_path / "run").lock()  # this process holds the run, as another job would
    try:
        r = torchrun(["stage", "--config", str(cfg)])
    finally:
        held.unlock()
    assert r.returncode != 0
    assert f"run directory is in use by process {os.getpid()}" in r.stderr
    assert not (tmp_path / "run/stages").exists()  # nothing trained, nothing written
