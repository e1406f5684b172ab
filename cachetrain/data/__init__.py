"""Stage-0 data: Fashion-MNIST and synthetic images in memory (tensors.py), image folders (folder.py,
with the DALI JPEG pipeline in jpeg.py and the per-file checks in images.py)."""

from __future__ import annotations

import torch

from cachetrain.config import DataConfig
from cachetrain.data.folder import FolderImages
from cachetrain.data.tensors import load_fmnist, make_synthetic
from cachetrain.dist import Shard
from cachetrain.errors import DataError
from cachetrain.source import Source


def open_dataset(cfg: DataConfig, seed: int, device: torch.device, workers: int = 1, backend: str = "auto",
                 shard: Shard = Shard()) -> Source:
    """The images; under torchrun, `shard` says which part of each global training batch this rank takes."""
    if cfg.name == "fmnist":
        return load_fmnist(cfg, seed, device, shard)
    if cfg.name == "synthetic":
        return make_synthetic(cfg, seed, device, shard)
    if cfg.name == "imagefolder":
        return FolderImages(cfg, seed, device, workers, backend, shard)
    raise DataError(f"data.name: unknown dataset {cfg.name!r}; expected fmnist, imagefolder or synthetic")
