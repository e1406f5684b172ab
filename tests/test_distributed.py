"""torchrun: data-parallel stages, end to end and caching passes, with gloo on this CPU.

Real `torchrun` jobs (`python -m torch.distributed.run ... -m cachetrain`) on a tiny synthetic run; what
needs NCCL and GPUs (`cachetrain.dist` joins `cpu:gloo,cuda:nccl` on CUDA) is not exercised here. The unit
tests at the bottom check the sharding itself in this process: every sample once per epoch across ranks,
whole chunks per rank, the same number of steps on every rank, and a batch some rank cannot fill refused
on every rank alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cachetrain.cache import CacheReader
from cachetrain.cache.source import CacheSource
from cachetrain.config import DataConfig, LoaderConfig
from cachetrain.data.tensors import TensorImages
from cachetrain.dist import Shard, rank_batches
from cachetrain.errors import CheckpointError, ConfigError
from cachetrain.run.checkpoint import Checkpoint
from cachetrain.step import train_step
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
    # the surviving rank says what happened in one line, not gloo's traceback; DDP warns of nothing
    assert "rank 0: another rank of the job is gone" in r.stderr
    assert "cachetrain/" not in r.stderr and "Grad strides" not in r.stderr + r.stdout
    # the resumed epoch's running sums (every rank's, saved by rank 0 in the checkpoint) give the same row
    assert results(tmp_path / "run") == results(two_rank_stage)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_the_rerun_ends_bit_identical(two_rank_stage,
                                                                                                 tmp_path):
    """Preemption under torchrun: only rank 1 gets SIGTERM (after step 5 of epoch 1; the last periodic
    checkpoint is at step 3); the ranks agree, both checkpoint at step 5 and exit 143 with one line from rank 0;
    the same torchrun command resumes from step 5 and ends with the uninterrupted job's bits."""
    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))
    r = torchrun(["stage", "--config", str(cfg), "--no-cache"], fault="train_step:5:sigterm", fault_rank=1)
    assert r.returncode != 0
    assert r.stderr.count("stopped by SIGTERM: stage 0 (k=2): checkpoint at epoch 1, batch 5/10 (step 5)") == 1, \
        r.stderr
    assert re.search(r"exitcode\s*:\s*143\b", r.stderr), r.stderr  # torchrun's failure table, one row a rank
    ck = torch.load(tmp_path / "run/stages/stage_0/checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["batch"], ck["step"], ck["world"]) == (0, 5, 5, 2)
    r = ok(torchrun(["stage", "--config", str(cfg), "--no-cache"]))
    assert "resuming at epoch 1, batch 5/10" in r.stdout
    assert same_bits(weights(tmp_path / "run"), weights(two_rank_stage))


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


# One epoch of a linear model on a store under torchrun, the global batch split unevenly: through the trainer's
# `fit` (global batch lengths from the plan) and through `train_one_epoch` alone (from a sum over the ranks).
# Rank 0 saves the weights each way.
WEIGHTING_JOB = """
import sys
import torch
from rich.console import Console
from torch import nn
from cachetrain.cache import CacheReader
from cachetrain.cache.source import CacheSource
from cachetrain.config import LoaderConfig, TrainConfig
from cachetrain.dist import Dist
from cachetrain.step import make_scheduler
from cachetrain.train.trainer import Position, fit, train_one_epoch

store, out, batch, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
dist, cpu = Dist.from_env("cpu"), torch.device("cpu")
reader = CacheReader(store, "fp")
source = CacheSource(reader, reader, LoaderConfig(workers=0, window_chunks=2), seed=5, device=cpu, shard=dist.shard)
cfg = TrainConfig(epochs=1, batch_size=batch, lr=lr, schedule="constant", device="cpu")
for way in ("fit", "sum"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    if way == "fit":
        scheduler = make_scheduler(optimizer, cfg, source.steps_per_epoch(batch), 1)
        fit(model, source, cfg, cpu, optimizer, scheduler, 1, Position(), lambda *a: None, lambda row: None,
            Console(quiet=True), "weighting", dist=dist)
    else:
        train_one_epoch(dist.wrap(model), source.train_batches(0, batch), optimizer, None, cpu, dist=dist)
    if dist.writer:
        torch.save(model.state_dict(), f"{out}/{way}.pt")
dist.close()
"""


def test_two_ranks_with_unequal_shares_take_the_one_process_steps_of_each_global_batch(tmp_path):
    """203 samples in chunks of 16 over 2 ranks: 13 chunks, 7 on one rank and 6 on the other, so each rank's
    share of a global batch of 24 holds 10 to 13 samples. DDP averages the ranks' gradients; each rank's loss
    is weighted by its share, so every step is one process's step on the mean loss of the whole global batch
    (here: rank 0's batch and rank 1's together), to float rounding. Unweighted, the ranks' samples count
    unequally: a few percent off per step."""
    store = tmp_path / "train.zarr"
    make_store(store, 203, chunk=16)
    batch, lr = 24, 2e-5
    job = tmp_path / "job.py"
    job.write_text(WEIGHTING_JOB)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ok(subprocess.run([*launch, str(job), str(store), str(tmp_path), str(batch), str(lr)], env=env(),
                      capture_output=True, text=True, timeout=300))

    cpu = torch.device("cpu")
    ranks = [CacheSource(CacheReader(store, "fp"), CacheReader(store, "fp"), LoaderConfig(workers=0, window_chunks=2),
                         seed=5, device=cpu, shard=Shard(r, 2)) for r in range(2)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(18, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    gaps = []
    for (x0, y0), (x1, y1) in zip(*(r.train_batches(0, batch) for r in ranks), strict=True):
        gaps.append(abs(len(y0) - len(y1)))
        train_step(model, torch.cat([x0, x1]), torch.cat([y0, y1]), optimizer)
    assert min(gaps) >= 2  # in every step, the ranks' shares differ by more than one sample
    for way in ("fit", "sum"):
        got = torch.load(tmp_path / f"{way}.pt", weights_only=True)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, way=way, k=k: f"{way} {k}: {m}")


def test_a_two_rank_stage_with_early_stopping_ends_with_the_best_epoch_on_every_rank(tmp_path):
    """A learning rate far too high makes validation loss rise after the first epoch; patience 1 stops the
    stage and keeps the best epoch's weights. Every rank must end with rank 0's selection (the job's weight-
    hash check fails otherwise), and the checkpoint holds it."""
    noisy = raw(tmp_path / "run", epochs=4, patience=1, lr=0.3, schedule="constant")
    noisy["data"]["synthetic_noise"] = 120
    ok(torchrun(["stage", "--config", str(write_config(tmp_path / "c.yaml", noisy)), "--no-cache"]))
    rows = results(tmp_path / "run")
    best = min(rows, key=lambda r: r["val_loss"])
    assert rows[-1]["selected_epoch"] == best["epoch"] and len(rows) == min(4, best["epoch"] + 1)
    assert rows[-1]["stopped_early"] and best["epoch"] < len(rows)  # an earlier epoch's weights restored
    ck = torch.load(tmp_path / "run/stages/stage_0/checkpoint.pt", weights_only=True)
    assert ck["test_acc"] == best["test_acc"]
    kept = ck["selection"]["best_state"]
    assert all(torch.equal(ck["model"][k.removeprefix("stage.")], v) for k, v in kept.items() if k.startswith("stage."))


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


def first_batch_error(source, epoch: int, batch_size: int) -> str | None:
    try:
        next(source.train_batches(epoch, batch_size, augment=False))
    except ConfigError as e:
        return str(e)
    return None


def test_a_batch_some_ranks_share_cannot_fill_is_refused_on_every_rank_in_every_epoch(tmp_path):
    """203 samples in chunks of 8 over 2 ranks: 104 samples on one rank, 99 (the 3-sample last chunk) on the
    other, which one depending on the epoch. Batches of 2 make 102 steps: the 99-sample rank cannot fill
    them. A check of each rank's own share raised on that rank alone and left the other waiting for it;
    every rank must refuse alike, before any batch, in every epoch."""
    train = make_store(tmp_path / "train.zarr", 203, chunk=8)
    sources = [CacheSource(train, train, LoaderConfig(workers=0), seed=5, device=torch.device("cpu"),
                           shard=Shard(r, 2)) for r in range(2)]
    expected = ("train.batch_size: a rank's share of an epoch can hold as few as 99 training samples, fewer than "
                "the 102 steps of an epoch; expected fewer ranks, a larger batch or smaller cache chunks "
                "(cache.chunk_mib)")
    assert {first_batch_error(s, epoch, 2) for s in sources for epoch in range(4)} == {expected}
    assert {first_batch_error(s, epoch, 3) for s in sources for epoch in range(4)} == {None}  # 68 steps fit


def test_an_image_batch_some_ranks_share_cannot_fill_is_refused_on_every_rank_without_naming_chunks():
    """101 images over 2 ranks: 51 and 50. Batches of 2 make 51 steps, one more than rank 1 holds."""
    n = 101
    x, y = torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
    cfg = DataConfig(name="synthetic", val_samples=0)
    images = [TensorImages("ids", (x, y), (x[:10], y[:10]), mean=0.0, std=1.0, num_classes=1, cfg=cfg, seed=3,
                           device=torch.device("cpu"), shard=Shard(r, 2)) for r in range(2)]
    expected = ("train.batch_size: a rank's share of an epoch can hold as few as 50 training samples, fewer than "
                "the 51 steps of an epoch; expected fewer ranks or a larger batch")
    assert [first_batch_error(s, 0, 2) for s in images] == [expected, expected]  # images have no chunks to name


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
    def at(batch: int, world: int = 1) -> Checkpoint:
        return Checkpoint(unit=0, k=1, model={}, optimizer={}, scheduler={}, epoch=0, epochs=2, batch=batch,
                          world=world)

    at(0, world=2).check_world(1)  # an epoch boundary: any number
    at(3).check_world(1)
    with pytest.raises(CheckpointError, match="taken mid-epoch by 2 process"):
        at(3, world=2).check_world(1)


def test_a_torchrun_job_on_a_run_in_use_is_refused_naming_the_holder(tmp_path):
    from cachetrain.run import RunLayout
    from cachetrain.run.lock import RunLock

    cfg = write_config(tmp_path / "c.yaml", raw(tmp_path / "run"))
    held = RunLock(RunLayout.of(tmp_path / "run"))
    held.acquire()  # this process holds the run, as another job would
    try:
        r = torchrun(["stage", "--config", str(cfg)])
    finally:
        held.release()
    assert r.returncode != 0
    assert f"run directory is in use by process {os.getpid()}" in r.stderr
    assert not (tmp_path / "run/stages").exists()  # nothing trained, nothing written
