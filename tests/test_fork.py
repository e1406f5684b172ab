"""`cachetrain fork`: a new run reusing another's stages 0..J-1 and caches, by hard links, never writing
into the parent; the fork's stage J trains on the very bytes its parent cached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cachetrain.cache.manifest import content_digest
from cachetrain.run import RunLayout
from cachetrain.run.checkpoint import Checkpoints
from cachetrain.run.records import Records
from tests.conftest import cli_in_process, tiny_run


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run (but its lock) and a digest of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fork")
    cfg_file, _ = tiny_run(tmp)
    r = cli_in_process(["train", "--config", str(cfg_file), "--set", "train.probes=false"])
    assert r.returncode == 0, r.stderr
    return tmp / "run"


def test_fork_reuses_stages_by_hard_link_and_never_writes_into_the_parent(parent, tmp_path):
    before = snapshot(parent)
    child = tmp_path / "child"
    r = cli_in_process(["fork", "--run", str(parent), "--at", "2", "--to", str(child), "--set", "stages.2.lr=0.01"])
    assert r.returncode == 0, r.stderr
    # stage 1's cache chunk files are the parent's inodes, not copies
    chunks = [p for p in (parent / "cache" / "stage_1" / "train.zarr").rglob("*") if p.is_file()
              and p.suffix != ".json"]
    assert chunks
    for p in chunks:
        assert os.stat(p).st_ino == os.stat(child / p.relative_to(parent)).st_ino
    status = cli_in_process(["status", "--run", str(child)])
    assert status.returncode == 0, status.stderr
    assert f"forked from {parent.resolve()} at stage 2" in status.stdout
    # the fork sees stages 0 and 1 trained and their caches complete; stage 2 runs with the change
    r = cli_in_process(["train", "--run", str(child), "--set", "train.probes=false"])
    assert r.returncode == 0, r.stderr
    child_rd, parent_rd = RunLayout.of(child), RunLayout.of(parent)
    assert Records(child_rd).read_metrics(0) == Records(parent_rd).read_metrics(0)  # not retrained
    ck = Checkpoints(child_rd).load(2)
    store = "cache/stage_1/train.zarr"
    # stage 2 of the fork trained on the bytes its parent cached, and recorded them
    assert ck.input_digests[store] == content_digest(parent / store)
    assert ck.config["stages"] == {2: {"lr": 0.01}}
    assert ck.optimizer["param_groups"][0]["initial_lr"] == pytest.approx(0.01)
    assert Checkpoints(parent_rd).load(2).optimizer["param_groups"][0]["initial_lr"] == pytest.approx(0.05)
    assert snapshot(parent) == before  # not one byte of the parent changed


def test_fork_refuses_changes_that_shape_the_reused_stages(parent, tmp_path):
    r = cli_in_process(["fork", "--run", str(parent), "--at", "1", "--to", str(tmp_path / "c"),
                        "--set", "model.width=4"])
    assert r.returncode == 2 and "model.width" in r.stderr
    assert not (tmp_path / "c").exists()


def test_fork_refuses_an_existing_target_and_a_bad_stage(parent, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("mine")
    r = cli_in_process(["fork", "--run", str(parent), "--at", "1", "--to", str(tmp_path / "c")])
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "c" / "x").read_text() == "mine"
    r = cli_in_process(["fork", "--run", str(parent), "--at", "7", "--to", str(tmp_path / "d")])
    assert r.returncode == 2 and "--at 7" in r.stderr
    r = cli_in_process(["fork", "--run", str(tmp_path / "nothing"), "--at", "1", "--to", str(tmp_path / "d")])
    assert r.returncode == 2 and "no run there" in r.stderr


def test_a_repair_in_the_fork_leaves_the_parent_intact(parent, tmp_path):
    child = tmp_path / "child"
    assert cli_in_process(["fork", "--run", str(parent), "--at", "2", "--to", str(child)]).returncode == 0
    before = snapshot(parent)
    chunk = next(p for p in sorted((child / "cache" / "stage_0" / "train.zarr").rglob("*"))
                 if p.is_file() and p.suffix != ".json")
    chunk.unlink()  # a lost chunk in the fork
    r = cli_in_process(["cache", "--run", str(child), "--j", "0", "--repair"])
    assert r.returncode == 0, r.stderr
    assert cli_in_process(["verify", "--run", str(child)]).returncode == 0
    assert snapshot(parent) == before
