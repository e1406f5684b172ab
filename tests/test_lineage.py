"""Lineage by content: a stage records the content digest of the stores it trained on, and any later
change to those bytes (a rebuild or a repair that does not restore them exactly) makes it stale."""

from __future__ import annotations

import shutil

import pytest
import torch

from cachetrain.cache.manifest import content_digest
from cachetrain.cli import main
from cachetrain.run import StageState
from cachetrain.train.inputs import StageInputs
from tests.conftest import greedy_of, flip_bytes, load, synthetic_raw, write_config

UNCOMPRESSED = {"codec": "none", "chunk_mib": 0.0625, "batch_size": 64}


def chunk_files(store):
    return sorted(p for p in (store / "features").rglob("*") if p.is_file() and p.name != "zarr.json")


def weights(run, j):
    return torch.load(run / "stages" / f"stage_{j}" / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A run trained end to end with nothing going wrong: the reference."""
    root = tmp_path_factory.mktemp("clean")
    cfg = write_config(root / "tiny.yaml", synthetic_raw(root / "run", cache=UNCOMPRESSED))
    assert main(["train", "--config", str(cfg)]) == 0
    return root / "run"


def fresh(tmp_path, clean, upto: int | None = None):
    """A copy of the clean run; with `upto`, only stages 0..upto-1 and their caches are kept."""
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    if upto is not None:
        for j in range(upto, 3):
            shutil.rmtree(run / "stages" / f"stage_{j}", ignore_errors=True)
            shutil.rmtree(run / "cache" / f"stage_{j}", ignore_errors=True)
    return write_config(tmp_path / "tiny.yaml", synthetic_raw(run, cache=UNCOMPRESSED)), run


def test_a_stage_records_the_digest_of_the_stores_it_trained_on(clean):
    recorded = torch.load(clean / "stages" / "stage_1" / "checkpoint.pt", weights_only=True)["input_digests"]
    assert recorded == {f"cache/stage_0/{s}.zarr": content_digest(clean / "cache" / "stage_0" / f"{s}.zarr")
                        for s in ("train", "val", "test")}
    assert all(recorded.values())


def test_flipped_bytes_stop_training_and_a_repair_gives_the_clean_run(tmp_path, clean, capsys):
    cfg, run = fresh(tmp_path, clean, upto=1)  # stage 0 trained and cached; 1 and 2 to train
    flip_bytes(chunk_files(run / "cache" / "stage_0" / "train.zarr")[1], at=100)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "chunk 1" in err and "--repair" in err
    assert not (run / "stages" / "stage_1" / "checkpoint.pt").exists()  # no step used the batch

    assert main(["cache", "--config", str(cfg), "--j", "0", "--repair"]) == 0
    assert main(["train", "--config", str(cfg)]) == 0
    for j in (1, 2):  # trained on exactly the clean bytes: the clean run's weights, bit for bit
        mine, ref = weights(run, j), weights(clean, j)
        assert all(torch.equal(mine[k], ref[k]) for k in ref), f"stage {j}"


def test_a_repair_that_restores_the_bytes_changes_nothing(tmp_path, clean, capsys):
    cfg, run = fresh(tmp_path, clean)
    store = run / "cache" / "stage_0" / "train.zarr"
    before = content_digest(store)
    chunk_files(store)[2].unlink()
    assert main(["cache", "--config", str(cfg), "--j", "0", "--repair"]) == 0
    assert content_digest(store) == before
    ckpts = {j: (run / "stages" / f"stage_{j}" / "checkpoint.pt").read_bytes() for j in range(3)}
    assert [r.state for r in greedy_of(load(cfg)).state.status()] == [StageState.TRAINED] * 3
    assert main(["train", "--config", str(cfg)]) == 0
    assert {j: (run / "stages" / f"stage_{j}" / "checkpoint.pt").read_bytes() for j in range(3)} == ckpts


class Shifted(torch.nn.Module):
    """A stage whose outputs come out slightly different, as nondeterministic kernels can make them."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        return self.stage(x) + 0.25


def test_a_repair_that_changes_bytes_makes_every_later_stage_stale(tmp_path, clean, capsys, monkeypatch):
    cfg, run = fresh(tmp_path, clean)
    store = run / "cache" / "stage_0" / "train.zarr"
    before = content_digest(store)
    chunk_files(store)[0].unlink()
    original = StageInputs.trained_stage
    with monkeypatch.context() as m:
        m.setattr(StageInputs, "trained_stage", lambda self, j: Shifted(original(self, j)) if j == 0 else original(self, j))
        assert main(["cache", "--config", str(cfg), "--j", "0", "--repair"]) == 0
    after = content_digest(store)
    assert after not in (None, before)

    capsys.readouterr()
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert [r.state for r in greedy_of(load(cfg)).state.status()] == [StageState.TRAINED, StageState.STALE, StageState.STALE]
    assert "stage 1 is stale: the bytes of its input store cache/stage_0/train.zarr changed" in out
    assert f"{before} -> {after}" in out

    assert main(["train", "--config", str(cfg)]) == 0
    assert [r.state for r in greedy_of(load(cfg)).state.status()] == [StageState.TRAINED] * 3
    ck = torch.load(run / "stages" / "stage_1" / "checkpoint.pt", weights_only=True)
    assert ck["input_digests"]["cache/stage_0/train.zarr"] == after


def test_a_retrain_that_fails_on_its_first_batch_keeps_the_stage_and_its_metrics(tmp_path, clean, capsys):
    cfg, run = fresh(tmp_path, clean)
    kept = {name: (run / "stages" / "stage_1" / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    flip_bytes(chunk_files(run / "cache" / "stage_0" / "train.zarr")[0], at=100)
    assert main(["stage", "--config", str(cfg), "--j", "1"]) == 2
    assert {name: (run / "stages" / "stage_1" / name).read_bytes() for name in kept} == kept
