"""Integrity and bad input: corrupt chunks are found and repaired alone; every fault is one line, exit 2,
and loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import zarr

from cachetrain.cache import CacheState
from cachetrain.run import StageState
from cachetrain.cli import main
from cachetrain.config import Config
from cachetrain.run import RunLayout
from cachetrain.run.lock import RunLock
from tests.conftest import greedy_of, synthetic_raw, write_config
from tests.conftest import cli


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """A finished tiny run (3 stages, caches of stages 0 and 1), trained once for the module."""
    d = tmp_path_factory.mktemp("trained")
    path = write_config(d / "tiny.yaml", synthetic_raw(d / "run", train={"epochs": 2}))
    assert main(["train", "--config", str(path)]) == 0
    return d / "run"


@pytest.fixture
def trained(trained_once, tmp_path):
    """This test's own copy of the finished run (tests damage it), and a config file naming the copy
    (run_dir is not a result key: the copy is the same run)."""
    shutil.copytree(trained_once, tmp_path / "run")
    path = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run", train={"epochs": 2}))
    return path, Config.from_dict(synthetic_raw(tmp_path / "run", train={"epochs": 2}))


def chunk_files(store: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((store / "features" / "c").rglob("*"))
            if p.is_file()}


def test_flipped_bytes_are_found_and_only_that_chunk_is_rewritten(trained, capsys):
    path, cfg = trained
    store = cfg.run_path / "cache" / "stage_0" / "train.zarr"
    before = chunk_files(store)
    victim = store / "features" / "c" / "5" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 1] ^= 0x55
    victim.write_bytes(bytes(data))
    capsys.readouterr()

    assert main(["verify", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    info = zarr.open_group(str(store), mode="r").attrs
    cs = info["chunk_samples"]
    assert f"train.zarr: chunk 5 (samples {5 * cs}-{6 * cs - 1}): corrupt" in out
    assert out.count(": corrupt") == 1 and "stage 1 test: every chunk verified" in out
    assert "1 corrupt or missing chunks; fix with: cachetrain cache" in out

    assert main(["cache", "--config", str(path), "--j", "0", "--repair"]) == 0
    after = chunk_files(store)
    assert after.keys() == before.keys()
    changed = [p for p in after if after[p][1] != before[p][1]]
    assert changed == [victim]  # only the corrupt chunk's file was written again...
    assert after[victim][0] == before[victim][0]  # ...and it holds exactly the original bytes
    assert main(["verify", "--config", str(path), "--j", "0"]) == 0


def test_missing_chunk_is_reported_and_repaired(trained, capsys):
    path, cfg = trained
    store = cfg.run_path / "cache" / "stage_1" / "test.zarr"
    victim = store / "features" / "c" / "0" / "0" / "0" / "0"
    original = victim.read_bytes()
    victim.unlink()
    capsys.readouterr()
    assert main(["verify", "--config", str(path), "--j", "1"]) == 1
    assert "chunk 0 (samples 0-" in capsys.readouterr().out
    assert main(["cache", "--config", str(path), "--j", "1", "--repair"]) == 0
    assert victim.read_bytes() == original


def test_input_cache_incomplete_is_refused(trained, capsys):
    path, cfg = trained
    zarr.open_group(str(cfg.run_path / "cache" / "stage_0" / "train.zarr"), mode="r+").attrs["complete"] = False
    capsys.readouterr()
    assert main(["stage", "--config", str(path), "--j", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.zarr: cache store is incomplete" in err and f"cachetrain cache --config {path} --j 0" in err
    assert err.count("\n") == 0


def test_stale_input_cache_is_refused_with_the_rebuild_command(trained, capsys):
    path, cfg = trained
    assert main(["stage", "--config", str(path), "--j", "0", "--no-cache", "--set", "train.seed=9",
                 "--from-stage", "0"]) == 0
    capsys.readouterr()
    assert main(["stage", "--config", str(path), "--j", "1", "--set", "train.seed=9"]) == 2
    err = capsys.readouterr().err.strip()
    # the suggested command names the run the way the user did
    assert "stale cache: fingerprint" in err and f"run: cachetrain cache --config {path} --set train.seed=9 --j 0" in err


def test_second_process_on_the_same_run_is_refused_naming_the_holder(tiny_config_file, tiny_config):
    lock = RunLock(RunLayout.of(tiny_config.run_path))
    lock.acquire()
    try:
        proc = cli(["train", "--config", str(tiny_config_file)])
    finally:
        lock.release()
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tiny_config.run_path}: run directory is in use by process {os.getpid()}; "
                                   f"wait for it to finish or stop it")


def test_truncated_checkpoint_falls_back_to_the_previous_one(trained, capsys):
    path, cfg = trained
    ck = cfg.run_path / "stages" / "stage_2" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 0  # retrains stage 2's last epoch from checkpoint.prev.pt
    assert "unreadable checkpoint (" in capsys.readouterr().out
    assert torch.load(ck, weights_only=False)["epoch"] == 2


def test_truncated_checkpoint_without_a_previous_one_is_a_clear_error(trained, capsys):
    path, cfg = trained
    stage_dir = cfg.run_path / "stages" / "stage_1"
    (stage_dir / "checkpoint.prev.pt").unlink()
    (stage_dir / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {stage_dir / 'checkpoint.pt'}: unreadable checkpoint (UnpicklingError) and no readable "
                   f"previous one; delete {stage_dir / 'checkpoint.pt'} to retrain stage 1 from scratch")


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    """The full disk in a real process (the command a user types: exit 2, one line); the rerun in this one.
    One stage is enough: the second checkpoint write is the end of stage 0's epoch 2 at any depth."""
    raw = synthetic_raw(tmp_path / "run", model={"stages": 1, "downsample": []}, train={"epochs": 2})
    path = write_config(tmp_path / "c.yaml", raw)
    proc = cli(["train", "--config", str(path)], fault="checkpoint_write:2:enospc")
    assert proc.returncode == 2 and proc.stderr.startswith("error: disk full while writing")
    assert proc.stderr.count("\n") == 1
    stage_dir = tmp_path / "run" / "stages" / "stage_0"
    assert torch.load(stage_dir / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not list(stage_dir.glob("*.tmp"))
    assert main(["train", "--config", str(path)]) == 0
    assert torch.load(stage_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # tests/test_disk_full.py fills a real tmpfs in make test
def test_disk_full_while_caching_never_marks_a_store_complete(tmp_path):
    """On a real, small tmpfs where this machine allows mounting one (root); else an injected ENOSPC
    raised where the writer thread writes a chunk. Either way the rerun after freeing space resumes."""
    disk = tmp_path / "disk"
    real_disk = _mount_tmpfs(disk, "400k")
    try:
        raw = synthetic_raw(disk / "run", model={"stages": 2}, cache={"codec": "none"})
        path = write_config(tmp_path / "c.yaml", raw)
        proc = cli(["train", "--config", str(path)], fault=None if real_disk else "cache_chunk:4:enospc")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: disk full while writing") and proc.stderr.count("\n") == 1
        g = greedy_of(Config.from_dict(raw))
        assert g.state.stage_state(0) is StageState.TRAINED  # the checkpoint made it; the cache did not
        assert g.state.cache_state(0)[0] is CacheState.WRITING
        if real_disk:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(["train", "--config", str(path)]) == 0  # the rerun, in this process (no fault set here)
        assert greedy_of(Config.from_dict(raw)).state.cache_state(0)[0] is CacheState.COMPLETE
    finally:
        if real_disk:
            subprocess.run(["umount", str(disk)], check=False)


def test_unknown_architecture_is_a_config_error(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", model={"arch": "transformer"}))
    assert main(["train", "--config", str(path)]) == 2
    assert "model.arch: expected one of 'layercnn', 'vgg', 'resnet', got 'transformer'" in capsys.readouterr().err


def test_repair_of_a_middle_chunk_of_a_later_stage_recomputes_only_it(trained, capsys):
    """Stage 1's caching pass reads stage 0's cache and stops mid-split: the loader must let go cleanly."""
    path, cfg = trained
    store = cfg.run_path / "cache" / "stage_1" / "train.zarr"
    before = chunk_files(store)
    assert len(before) >= 6
    victim = sorted(before, key=lambda p: int(p.parts[-4]))[len(before) // 2]
    original = victim.read_bytes()
    victim.write_bytes(original[:-8] + b"garbage!")
    assert main(["cache", "--config", str(path), "--j", "1", "--repair"]) == 0
    after = chunk_files(store)
    assert [p for p in after if after[p][1] != before[p][1]] == [victim] and victim.read_bytes() == original


def test_verify_reports_a_missing_store(trained, capsys):
    path, cfg = trained
    shutil.rmtree(cfg.run_path / "cache" / "stage_0" / "test.zarr")
    capsys.readouterr()
    assert main(["verify", "--config", str(path)]) == 1
    assert "test.zarr: store: store missing" in capsys.readouterr().out
    assert main(["verify", "--config", str(path), "--j", "7"]) == 2
