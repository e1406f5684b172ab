"""Crash safety with real processes: SIGKILL at many points, rerun, and compare bit for bit.

Kills are real `kill -9`s: either the process sends SIGKILL to itself at a named point
(CACHETRAIN_FAULT, see cachetrain/faults.py), or the test kills it from outside at a moment it
observes on disk. `status` runs in this process: it only reads the run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cachetrain.cli import main
from tests.conftest import cli, cli_popen, synthetic_raw, write_config

# `cli` stays importable from here for tests/test_integrity.py and tests/test_durable.py until they import it
# from tests.conftest

KILL_CHAIN = [  # each entry: the fault that kills one run; every run resumes the one before
    "train_step:5",        # stage 0, epoch 1, after step 5 (a mid-epoch checkpoint exists at step 3)
    "checkpoint_write:2",  # the second checkpoint of the resumed run: temp file written, not renamed
    "train_step:14",       # stage 0, epoch 2
    "stage_end:1",         # stage 0 trained, its cache not started
    "cache_chunk:9",       # stage 0's cache half written
    "cache_finish:1",      # a store with every chunk written, its complete flag not yet set
    "train_step:4",        # stage 1, epoch 1
    "cache_chunk:3",       # stage 1's cache being written
]


def raw_config(run_dir: Path) -> dict:
    """3 stages, 2 epochs of 12 steps (384 samples, batches of 32), a checkpoint every 3 steps."""
    return synthetic_raw(run_dir, model={"stages": 3}, train={"epochs": 2, "checkpoint_steps": 3})


def status(path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    return capsys.readouterr().out


def snapshot(run_dir: Path, depth: int = 3) -> dict[str, np.ndarray]:
    """Every stage's trained weights and every cache array, as numpy arrays keyed by name."""
    out = {}
    for j in range(depth):
        ck = torch.load(run_dir / "stages" / f"stage_{j}" / "checkpoint.pt", weights_only=False)
        assert ck["epoch"] == ck["epochs"] == 2
        for part in ("model", "head"):
            for name, tensor in ck[part].items():
                out[f"stage{j}.{part}.{name}"] = tensor.numpy()
        for split in ("train", "test"):
            store = run_dir / "cache" / f"stage_{j}" / f"{split}.zarr"
            if store.exists():
                group = zarr.open_group(str(store), mode="r")
                assert group.attrs["complete"] is True
                out[f"cache{j}.{split}.features"] = group["features"][:]
                out[f"cache{j}.{split}.labels"] = group["labels"][:]
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert {k.split(".")[0] for k in a} == {"stage0", "stage1", "stage2", "cache0", "cache1"}
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run, trained in this process: which process made a run may not change its bits
    (every killed and resumed run below is a real process)."""
    d = tmp_path_factory.mktemp("reference")
    path = write_config(d / "c.yaml", raw_config(d / "run"))
    assert main(["train", "--config", str(path)]) == 0
    return snapshot(d / "run")


@pytest.mark.slow
def test_sigkill_chain_resumes_bit_identically(reference, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    for i, fault in enumerate(KILL_CHAIN):
        proc = cli(["train", "--config", str(path)], fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
        if i == 0:  # killed after step 5: the last checkpoint is step 3's, and status names it
            out = status(path, capsys)
            assert "partial" in out and "0/2 +3 batches" in out
            assert "next: train resumes stage 0 at epoch 1, batch 3" in out
    assert "next: train finishes the cache of stage 1" in status(path, capsys)
    proc = cli(["train", "--config", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert_identical(snapshot(tmp_path / "run"), reference)


def test_kill_from_outside_mid_epoch_resumes_bit_identically(reference, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    proc = cli_popen(["train", "--config", str(path)])
    checkpoint = tmp_path / "run" / "stages" / "stage_1" / "checkpoint.pt"
    deadline = time.time() + 240  # a liveness bound, not a measurement: the run takes seconds
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in stage 1, after its first mid-epoch checkpoint
    assert proc.wait() == -signal.SIGKILL
    assert "next: train resumes stage 1" in status(path, capsys)
    assert cli(["train", "--config", str(path)]).returncode == 0
    assert_identical(snapshot(tmp_path / "run"), reference)
