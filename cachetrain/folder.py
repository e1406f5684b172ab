"""ImageFolder datasets (a user's own data, ImageNet-style `train/` and `val/` trees) on the CPU path.

torchvision's ImageFolder + transforms in a DataLoader with worker processes; training uses
random-resized-crop + flip, evaluation and the caching pass resize + center-crop. The shuffle order
is drawn from (seed, epoch) and handed to the DataLoader as an explicit index list, so it is the
same order the tensor datasets and the cache loader would use, and resumable mid-epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cachetrain.config import DataConfig
from cachetrain.data import Batch, DataError, data_root, fingerprint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _subset(ds, n: int):
    """Keep n samples spread evenly over the (class-sorted) file list, so every class stays represented."""
    if n and n < len(ds.samples):
        keep = np.linspace(0, len(ds.samples) - 1, n).round().astype(int)
        ds.samples = [ds.samples[i] for i in keep]
        ds.targets = [ds.targets[i] for i in keep]
        ds.imgs = ds.samples
    return ds


class FolderImages:
    def __init__(self, cfg: DataConfig, seed: int, device: torch.device, workers: int, backend: str = "auto"):
        from torchvision import datasets, transforms as T

        root = Path(data_root(cfg))
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"data.root: {root / split} is not a directory; an imagefolder dataset needs "
                                f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        size = cfg.image_size
        self.train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip() if cfg.flip else T.Identity(),
                                   T.ToTensor(), T.Normalize(MEAN, STD)])
        self.eval_tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
        train = _subset(datasets.ImageFolder(str(root / "train"), transform=self.train_tf), cfg.train_subset)
        train_eval = copy.copy(train)  # the same file list (scanned once), evaluation transforms
        train_eval.transform = self.eval_tf
        self._sets = {"train": train, "train_eval": train_eval,
                      "test": _subset(datasets.ImageFolder(str(root / "val"), transform=self.eval_tf), cfg.test_subset)}
        for name, ds in self._sets.items():
            if len(ds) == 0:
                raise DataError(f"data.root: {root / ('val' if name == 'test' else 'train')} holds no images")
        self.num_classes = len(self._sets["train"].classes)
        self.sample_shape = (3, size, size)
        self.seed, self.device, self.workers = seed, device, workers
        self.size, self.flip_aug = size, cfg.flip
        from cachetrain.dali import dali_available, require_dali
        if backend == "dali":
            require_dali()
        self.use_dali = backend == "dali" or (backend == "auto" and device.type == "cuda" and dali_available())
        files = [str(Path(p).relative_to(root)) for p, _ in self._sets["train"].samples + self._sets["test"].samples]
        self.fingerprint = fingerprint({"dataset": "imagefolder", "files": fingerprint(files), "size": size,
                                        "eval": "resize8/7-centercrop", "mean": MEAN, "std": STD})

    def num_samples(self, split: str) -> int:
        return len(self._sets[split])

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._sets[split].targets, dtype=np.int64)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_samples("train") // batch_size)

    def _load(self, ds, indices, batch_size: int, seed: int) -> Iterator[Batch]:
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        loader = DataLoader(ds, batch_sampler=batches, num_workers=self.workers,
                            generator=torch.Generator().manual_seed(seed), pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _dali(self, name: str, train: bool, batch_size: int, epoch: int, start: int) -> Iterator[Batch]:
        from cachetrain.dali import folder_files, image_batches
        files, labels = folder_files(self._sets[name])
        return image_batches(files, labels, self.size, train, batch_size, self.seed, epoch, start, self.device,
                             self.workers, self.flip_aug, MEAN, STD)

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0, augment: bool = True) -> Iterator[Batch]:
        name = "train" if augment else "train_eval"
        if self.use_dali and augment:
            yield from self._dali("train", True, batch_size, epoch, start_batch * batch_size)
            return
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples("train")).tolist()
        # the workers' augmentation seeds come from (seed, epoch, start_batch): resuming mid-epoch
        # repeats the order exactly; the random crops after the resume point are fresh draws
        yield from self._load(self._sets[name], order[start_batch * batch_size:], batch_size,
                              seed=hash((self.seed, epoch, start_batch)) & 0x7FFFFFFF)

    def augmented_batches(self, batch_size: int, start: int, view: int) -> Iterator[Batch]:
        """The training split in sample order under the training transforms (a cache view)."""
        if self.use_dali:
            from cachetrain.dali import folder_files, image_batches
            files, labels = folder_files(self._sets["train"])
            yield from image_batches(files, labels, self.size, True, batch_size, self.seed + view, 0, start,
                                     self.device, self.workers, self.flip_aug, MEAN, STD, shuffle=False)
            return
        yield from self._load(self._sets["train"], list(range(start, self.num_samples("train"))), batch_size,
                              seed=hash((self.seed, view, start)) & 0x7FFFFFFF)

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        name = "train_eval" if split == "train" else "test"
        if self.use_dali:
            yield from self._dali(name, False, batch_size, 0, start)
            return
        ds = self._sets[name]
        yield from self._load(ds, list(range(start, len(ds))), batch_size, seed=0)
