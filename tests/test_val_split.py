"""The validation split (data.val_samples, data.split_seed): held out of the training split by a seeded
permutation, the same whatever the training seed, across reopen and resume; cached and verified like the
other splits; bad values one line; a run from before the split is stale, not silently mixed."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from cachetrain.cli import main
from cachetrain.run import StageState
from cachetrain.config import Config, DataConfig
from cachetrain.data import open_dataset
from cachetrain.data.split import val_count
from tests.conftest import greedy_of, cli, cli_in_process, fmnist_raw, flip_bytes, synthetic_raw, write_config

CPU = torch.device("cpu")
# The dataset fingerprint cachetrain wrote for `synthetic_raw`'s data before the validation split existed
# (computed with the code of commit d2ad062): what a checkpoint of a run started then records.
FINGERPRINT_BEFORE_SPLIT = "1b7da00be5b610f6"


def images(source, split: str) -> list[bytes]:
    """Each sample of `split` as the bytes of its plain image: names a sample whatever split holds it."""
    return [x[i].numpy().tobytes() for x, _ in source.eval_batches(split, 64) for i in range(len(x))]


def data_config(**data) -> DataConfig:
    return Config.from_dict(synthetic_raw(Path("unused"), data=data)).data


def test_default_split_is_a_twelfth_of_the_training_split():
    assert val_count(DataConfig(), 60_000) == 5_000  # Fashion-MNIST's training split
    assert val_count(DataConfig(val_samples=0.25), 400) == 100
    assert val_count(DataConfig(val_samples=0.01), 20) == 1  # a fraction never rounds to no split
    assert val_count(DataConfig(), 5) == 1


@pytest.mark.parametrize("data", [{}, fmnist_raw(Path("unused"), train=600, test=100)["data"]],
                         ids=["synthetic", "fmnist-subset"])
def test_val_and_train_are_disjoint_and_make_up_the_training_subset(data):
    whole = open_dataset(data_config(**data, val_samples=0), 0, CPU)  # the training subset, nothing held out
    split = open_dataset(data_config(**data), 0, CPU)
    n = whole.num_samples("train")
    assert n == (data.get("train_subset") or 384)
    assert split.num_samples("val") == round(n / 12) and split.num_samples("train") == n - round(n / 12)

    position = {img: i for i, img in enumerate(images(whole, "train"))}
    assert len(position) == n  # every sample's image is its own, so it names the sample
    train = [position[img] for img in images(split, "train")]
    val = [position[img] for img in images(split, "val")]
    assert not set(train) & set(val) and sorted(train + val) == list(range(n))
    assert train == sorted(train) and val == sorted(val)  # both parts keep the original sample order
    labels = whole.labels("train")
    assert np.array_equal(split.labels("train"), labels[train]) and np.array_equal(split.labels("val"), labels[val])
    # the test split is not touched
    assert images(split, "test") == images(whole, "test")


def jpeg_tree(root: Path) -> Path:
    """<root>/train/<class>/ with 8 noise JPEGs per class (every one different), <root>/val/<class>/ with 2."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for c in ("a_shirt", "b_shoe", "c_bag"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("backend", ["numpy", "dali"])
def test_image_folder_holds_val_out_of_its_train_files(tmp_path, backend):
    from cachetrain.data.folder import FolderImages

    root = jpeg_tree(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8)
    whole = FolderImages(replace(cfg, val_samples=0), 0, CPU, workers=0, backend="numpy")
    split = FolderImages(cfg, 0, CPU, workers=0, backend=backend)
    assert (split.num_samples("train"), split.num_samples("val"), split.num_samples("test")) == (22, 2, 6)
    position = {img: i for i, img in enumerate(images(whole, "train"))}
    assert len(position) == 24
    if backend == "numpy":  # the same decoder as `whole`: each image names its file exactly
        train = [position[img] for img in images(split, "train")]
        val = [position[img] for img in images(split, "val")]
        assert not set(train) & set(val) and sorted(train + val) == list(range(24))
        assert np.array_equal(split.labels("val"), whole.labels("train")[val])
    ys = torch.cat([y for _, y in split.eval_batches("val", 4)]).numpy()  # DALI: its own pipeline over the val files
    assert np.array_equal(ys, split.labels("val"))
    assert sum(len(y) for _, y in split.train_batches(0, 8)) == 22
    assert split.metadata()["val_split"]["samples"] == 2
    assert FolderImages(replace(cfg, split_seed=1), 0, CPU, workers=0, backend="numpy").fingerprint != split.fingerprint


def test_the_split_follows_split_seed_and_ignores_the_training_seed():
    cfg = data_config()
    first = open_dataset(cfg, 0, CPU)
    val = images(first, "val")
    reopened, other_training_seed = open_dataset(cfg, 0, CPU), open_dataset(cfg, 7, CPU)
    assert images(reopened, "val") == val and images(other_training_seed, "val") == val
    assert other_training_seed.metadata() == first.metadata()
    assert other_training_seed.fingerprint == first.fingerprint
    assert images(other_training_seed, "train") == images(first, "train")

    other_split = open_dataset(data_config(split_seed=1), 0, CPU)
    assert other_split.num_samples("val") == first.num_samples("val")
    assert set(images(other_split, "val")) != set(val)
    assert other_split.metadata()["val_split"]["indices_sha256"] != first.metadata()["val_split"]["indices_sha256"]
    assert other_split.fingerprint != first.fingerprint  # caches made under one split are stale under the other


def test_training_batches_never_hold_a_validation_sample():
    d = open_dataset(data_config(), 0, CPU)
    val = set(images(d, "val"))
    seen = [x[i].numpy().tobytes() for x, _ in d.train_batches(0, 32, augment=False) for i in range(len(x))]
    assert len(seen) == d.num_samples("train") and not val & set(seen)


def val_store(run: Path, j: int) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(run / "cache" / f"stage_{j}" / "val.zarr"), mode="r")
    assert group.attrs["complete"] is True
    return {"features": group["features"][:], "labels": group["labels"][:]}


def resume_raw(run: Path) -> dict:
    """2 stages, 1 epoch of 11 steps (352 training samples, batches of 32), a checkpoint every 3 steps."""
    return synthetic_raw(run, model={"stages": 2}, train={"checkpoint_steps": 3})


@pytest.mark.slow
def test_split_and_val_store_are_the_same_after_a_mid_stage_kill_and_resume(tmp_path, capsys):
    ref = write_config(tmp_path / "ref.yaml", resume_raw(tmp_path / "ref"))
    assert main(["train", "--config", str(ref)]) == 0
    path = write_config(tmp_path / "c.yaml", resume_raw(tmp_path / "run"))
    proc = cli(["train", "--config", str(path)], fault="train_step:5")  # stage 0, mid-epoch (checkpoint at step 3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    assert "next: train resumes stage 0 at epoch 1, batch 3" in capsys.readouterr().out
    assert cli(["train", "--config", str(path)]).returncode == 0

    meta = [yaml.safe_load((tmp_path / r / "run.json").read_text())["data"]["val_split"] for r in ("ref", "run")]
    assert meta[0] == meta[1] and meta[0]["samples"] == 32
    resumed, reference = val_store(tmp_path / "run", 0), val_store(tmp_path / "ref", 0)
    for key in ("features", "labels"):
        assert resumed[key].tobytes() == reference[key].tobytes(), key
    g = greedy_of(Config.from_dict(resume_raw(tmp_path / "run")))
    assert np.array_equal(resumed["labels"], g.run.data.labels("val"))
    # stage 1 reads the val split from stage 0's cache: the same samples
    source = g.inputs.input_source(1)
    assert source.num_samples("val") == 32 and np.array_equal(source.labels("val"), g.run.data.labels("val"))


def test_recomputed_inputs_serve_the_same_val_split(tmp_path):
    g = greedy_of(Config.from_dict(synthetic_raw(tmp_path / "run", model={"stages": 2}, cache={"mode": "none"})))
    g.train_stage(0)
    source = g.inputs.input_source(1)  # stage 0's outputs, computed on the fly from the images
    assert source.num_samples("val") == g.run.data.num_samples("val") == 32
    ys = torch.cat([y for _, y in source.eval_batches("val", 10)]).numpy()
    assert np.array_equal(ys, g.run.data.labels("val"))


def test_corrupt_val_store_is_named_by_verify_and_repaired(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", model={"stages": 2}))
    assert main(["train", "--config", str(path)]) == 0
    store = tmp_path / "run" / "cache" / "stage_0" / "val.zarr"
    victim = store / "features" / "c" / "0" / "0" / "0" / "0"
    original = victim.read_bytes()
    capsys.readouterr()
    assert main(["verify", "--config", str(path)]) == 0
    assert "stage 0 val: every chunk verified" in capsys.readouterr().out

    flip_bytes(victim)
    assert main(["verify", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "val.zarr: chunk 0 (samples 0-" in out and out.count(": corrupt") == 1
    assert main(["cache", "--config", str(path), "--j", "0", "--repair"]) == 0
    assert victim.read_bytes() == original
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stale" not in out  # stage 1 read the val store's bytes: restored exactly, so it is still current


@pytest.mark.parametrize("value, expected", [
    (-1, "an integer >= 0, a fraction in (0, 1) or null, got -1"),
    (1.5, "an integer >= 0, a fraction in (0, 1) or null, got 1.5"),
    (0.0, "got 0.0"),
    ("many", "got 'many'"),
])
def test_bad_val_samples_is_one_line_naming_the_key(tmp_path, value, expected):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    proc = cli_in_process(["train", "--config", str(path), "--set", f"data.val_samples={value}"])
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "data.val_samples" in err and expected in err and "\n" not in err


def test_val_split_that_leaves_no_training_sample_is_refused_when_the_data_is_opened(tmp_path):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", data={"val_samples": 384}))
    proc = cli(["train", "--config", str(path)])
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("error: data.val_samples: 384 ")
    assert "of the 384 samples of the training split" in err and "leaves no training sample" in err
    assert not list((tmp_path / "run").glob("stages/*"))


def test_no_val_split_trains_without_a_val_store(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", data={"val_samples": 0}))
    assert main(["train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "cache").rglob("*.zarr")) == ["test.zarr"] * 2 + ["train.zarr"] * 2
    assert yaml.safe_load((run / "run.json").read_text())["data"]["val_split"]["samples"] == 0
    capsys.readouterr()
    assert main(["verify", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stage 0 train: every chunk verified" in out and "stage 0 val" not in out
    g = greedy_of(Config.from_dict(synthetic_raw(run, data={"val_samples": 0})))
    assert [g.state.stage_state(j) for j in range(3)] == [StageState.TRAINED] * 3
    assert g.run.data.num_samples("train") == 384  # the whole training split is trained on
    for j in (0, 1, 2):  # images, then caches
        source = g.inputs.input_source(j)
        assert source.num_samples("val") == 0 and len(source.labels("val")) == 0
        assert list(source.eval_batches("val", 32)) == []


def test_run_started_before_the_split_is_stale_because_its_input_changed(tmp_path, capsys):
    """A run from before data.val_samples existed: config.yaml lacks the keys, stage 0's checkpoint records
    the dataset fingerprint of the whole training split. Its stage and cache must not be reused as if they
    had been made on the training part alone."""
    raw = synthetic_raw(tmp_path / "run", model={"stages": 2})
    path = write_config(tmp_path / "c.yaml", raw)
    assert main(["stage", "--config", str(path), "--j", "0", "--no-cache"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("val_samples", "split_seed"):
        del saved["data"][key]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    ck_path = run / "stages" / "stage_0" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)
    ck["input_fingerprint"] = FINGERPRINT_BEFORE_SPLIT
    for key in ("val_samples", "split_seed"):
        del ck["config"]["data"][key]
    torch.save(ck, ck_path)

    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stage 0 is stale: its input changed since it was trained" in out
    assert "next: train retrains stage 0 from scratch" in out


def test_a_run_before_the_split_stays_valid_with_no_validation_split(tmp_path, capsys):
    """The same old run under `data.val_samples: 0` trains on the very samples it did: nothing changed, so
    nothing is stale (the demo's config holds none out, and its runs from before stay finished)."""
    raw = synthetic_raw(tmp_path / "run", model={"stages": 2}, data={"val_samples": 0})
    path = write_config(tmp_path / "c.yaml", raw)
    assert main(["stage", "--config", str(path), "--j", "0", "--no-cache"]) == 0
    ck_path = tmp_path / "run" / "stages" / "stage_0" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)
    assert ck["input_fingerprint"] == FINGERPRINT_BEFORE_SPLIT  # what the code before the split recorded
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    assert "stale" not in capsys.readouterr().out
