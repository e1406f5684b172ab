"""Image folders (the ImageNet path) on the CPU: PIL + torchvision transforms in DataLoader workers, and
DALI's CPU-only decoding, for stage 0 training and its caching pass, on real Fashion-MNIST JPEGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachetrain.cache import CacheState
from cachetrain.config import Config
from cachetrain.data.tensors import load_fmnist
from cachetrain.config import DataConfig
from cachetrain.data.folder import FolderImages
from cachetrain.run import StageState
from tests.conftest import greedy_of


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """300 training and 100 validation Fashion-MNIST images as RGB JPEGs in class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    # val_samples=0: every one of the 300 training images goes into train/ (the folder holds out its own)
    data = load_fmnist(DataConfig(train_subset=300, test_subset=100, val_samples=0), seed=0,
                       device=torch.device("cpu"))
    for split, name in (("train", "train"), ("test", "val")):
        x, y = data.images(split)
        for i in range(len(y)):
            d = root / name / f"class{int(y[i]):02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).convert("RGB").save(d / f"{i:05d}.jpg", quality=90)
    return root


def folder_raw(root, run_dir, backend: str) -> dict:
    return {"name": "folder", "run_dir": str(run_dir),
            "data": {"name": "imagefolder", "root": str(root), "image_size": 24},
            "model": {"arch": "layercnn", "stages": 2, "width": 8, "downsample": [1], "k": 2},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            "cache": {"chunk_mib": 0.25},
            "loader": {"backend": backend, "workers": 1}}


@pytest.mark.parametrize("backend", ["numpy", "dali"])
def test_stage0_trains_and_caches_from_jpegs(jpeg_folder, tmp_path, backend):
    cfg = Config.from_dict(folder_raw(jpeg_folder, tmp_path / "run", backend))
    g = greedy_of(cfg)
    assert g.run.data.use_dali == (backend == "dali")
    rows = g.train_all()
    assert [r.state for r in rows] == [StageState.TRAINED, StageState.TRAINED]
    assert rows[0].cache is CacheState.COMPLETE
    assert rows[1].test_acc > 0.25, rows[1].test_acc  # chance is 0.10
    assert g.inputs.input_source(1).num_samples("train") == 275  # 25 of train/'s 300 files held out for validation
    assert g.inputs.input_source(1).num_samples("val") == 25


def test_dali_and_torchvision_eval_batches_agree_on_samples(jpeg_folder):
    cfg = DataConfig(name="imagefolder", root=str(jpeg_folder), image_size=24)
    tv = FolderImages(cfg, 0, torch.device("cpu"), workers=1, backend="numpy")
    dali = FolderImages(cfg, 0, torch.device("cpu"), workers=1, backend="dali")
    (xa, ya), (xb, yb) = [tuple(torch.cat(t) for t in zip(*src.eval_batches("test", 40))) for src in (tv, dali)]
    assert torch.equal(ya, yb) and xa.shape == xb.shape == (100, 3, 24, 24)
    # same images, decoded and resized by two libraries: close, not equal
    assert (xa - xb).abs().mean() < 0.15
    train_ids = [y for _, y in dali.train_batches(0, 64)]
    assert sum(len(y) for y in train_ids) == 275  # train/'s 300 files, 25 held out for validation
    assert not np.array_equal(torch.cat(train_ids).numpy(), tv.labels("train"))  # shuffled
