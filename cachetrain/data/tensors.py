"""Stage-0 inputs held in memory as uint8 tensors: Fashion-MNIST and synthetic images.

Each is a `Source` (cachetrain/source.py): `train_batches(epoch)` yields augmented, shuffled batches
(a pure function of (seed, epoch)) and `eval_batches(split)` yields plain batches in sample order,
which is what the caching pass reads. The validation split ("val") is held out of the training split
when the dataset is built (cachetrain.data.split); "train" is the rest, in the original order.

Fashion-MNIST is unpacked from the Debian package's .gz files into the data root on first use; runs
starting together on one empty data root take turns under a lock, so none ever reads a half-written
file, and a data root that cannot be written is one DataError line saying how to choose another.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cachetrain.errors import DataError
from cachetrain.augment import batch_rng, crop_flip
from cachetrain.config import DataConfig
from cachetrain.data.split import hold_out
from cachetrain.dist import Shard
from cachetrain.source import Batch, epoch_order, fingerprint, image_shares, train_plan

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"


class TensorImages:
    """An in-memory uint8 image dataset (Fashion-MNIST, synthetic): batches are gathered, normalised and
    augmented on the device, with no per-sample Python work."""

    def __init__(self, name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 mean: float, std: float, num_classes: int, cfg: DataConfig, seed: int, device: torch.device,
                 generator: dict | None = None, shard: Shard = Shard()):
        for split, (_, y) in (("train", train), ("test", test)):
            if len(y) == 0:
                raise DataError(f"data: the {name} {split} split has no samples")
        self.split = hold_out(cfg, len(train[1]))  # the validation samples, held out of the training split
        parts = {"train": torch.from_numpy(self.split.train), "val": torch.from_numpy(self.split.val)}
        self._x = {**{s: train[0][i] for s, i in parts.items()}, "test": test[0]}  # (N, C, H, W) uint8
        self._y = {**{s: train[1][i].long() for s, i in parts.items()}, "test": test[1].long()}
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        self.sample_shape = tuple(train[0].shape[1:])
        self.padding, self.flip = cfg.crop_padding, cfg.flip
        self.seed, self.device, self.shard = seed, device, shard
        # what determines the plain (unaugmented) images the caching pass sees
        self.fingerprint = fingerprint({"dataset": name, "n": [len(train[1]), len(test[1])], "shape": self.sample_shape,
                                        "mean": mean, "std": std, "subset": [cfg.train_subset, cfg.test_subset],
                                        "generator": generator, **self.split.fingerprint_keys()})

    def metadata(self) -> dict:
        """What a run records about its data: which training samples it holds out for validation."""
        return {"val_split": self.split.metadata()}

    def num_samples(self, split: str) -> int:
        return len(self._y[split])

    def images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's images as stored, (N, C, H, W) uint8 on the CPU, and their labels: unnormalised and
        unaugmented (to export them, e.g. as an image folder)."""
        return self._x[split], self._y[split]

    def labels(self, split: str) -> np.ndarray:
        return self._y[split].numpy()

    def _batch(self, split: str, idx: torch.Tensor) -> Batch:
        x = self._x[split][idx].to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        return x, self._y[split][idx].to(self.device, non_blocking=True)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_samples("train") // batch_size)

    def share_sizes(self, epoch: int) -> list[int]:
        return image_shares(self.num_samples("train"), self.shard)

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0, augment: bool = True) -> Iterator[Batch]:
        n = self.num_samples("train")
        order = epoch_order(self.seed, epoch, n)[self.shard.rank::self.shard.world]
        plan = train_plan(order, batch_size, self.steps_per_epoch(batch_size), self.shard, n // self.shard.world)
        for b in range(start_batch, len(plan)):
            x, y = self._batch("train", torch.from_numpy(plan[b]))
            rng = batch_rng(self.seed, epoch, b, self.shard.rank)
            yield (crop_flip(x, self.padding, self.flip, rng) if augment else x), y

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        for i in range(start, self.num_samples(split), batch_size):
            yield self._batch(split, torch.arange(i, min(i + batch_size, self.num_samples(split))))

    def augmented_batches(self, batch_size: int, start: int, view: int) -> Iterator[Batch]:
        """The training split in sample order under stage-0 augmentation: view `view` of a cache. Draws
        depend on (seed, view, position), so a resumed caching pass repeats them."""
        for i in range(start, self.num_samples("train"), batch_size):
            x, y = self._batch("train", torch.arange(i, min(i + batch_size, self.num_samples("train"))))
            yield crop_flip(x, self.padding, self.flip, batch_rng(self.seed, 1_000_000 + view, i)), y


def _subset(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (x[:n], y[:n]) if n else (x, y)


FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _not_writable(e: OSError, root: Path) -> DataError:
    return DataError(f"data.root: cannot write to {e.filename or root} ({e.strerror}); Fashion-MNIST is unpacked "
                     f"into the data root {root} on first use: set data.root or $CACHETRAIN_DATA to a writable folder")


def _unpack_fmnist(root: Path, raw: Path) -> None:
    """Unpack the missing .gz files into `raw`. Several processes may start on one empty data root at once:
    they take turns under an flock on raw/.unpack.lock, and each file is written under a name of this
    process's own, then renamed into place, so a file under its final name is always whole."""
    sources = {}
    for name in FMNIST_FILES:
        if not (raw / name).exists():
            sources[name] = next((d / f"{name}.gz" for d in (raw, DEBIAN_FMNIST) if (d / f"{name}.gz").exists()), None)
            if sources[name] is None:
                raise DataError(f"Fashion-MNIST file {name}.gz not found in {raw} or {DEBIAN_FMNIST}; "
                                f"install it with: {FMNIST_INSTALL}")
    try:
        raw.mkdir(parents=True, exist_ok=True)
        lock = os.open(raw / ".unpack.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno in READ_ONLY:
            raise _not_writable(e, root) from None
        raise
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process unpacks; it may leave nothing to do
        for name, gz in sources.items():
            if (raw / name).exists():  # unpacked by another process while this one waited
                continue
            tmp = raw / f".{name}.{os.getpid()}.tmp"
            try:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, raw / name)
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise DataError(f"{gz}: not a readable gzip file ({e}); reinstall it with: {FMNIST_INSTALL}") from None
            except OSError as e:
                if e.errno in READ_ONLY:
                    raise _not_writable(e, root) from None
                raise
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        os.close(lock)  # releases the flock


def load_fmnist(cfg: DataConfig, seed: int, device: torch.device, shard: Shard = Shard()) -> TensorImages:
    from torchvision.datasets import FashionMNIST

    root = cfg.resolved_root
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name).exists() for name in FMNIST_FILES):
        _unpack_fmnist(root, raw)
    splits = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=False)
        x, y = ds.data.unsqueeze(1), ds.targets  # (N, 1, 28, 28) uint8
        splits.append(_subset(x, y, cfg.train_subset if train else cfg.test_subset))
    return TensorImages("fmnist", splits[0], splits[1], mean=0.2860, std=0.3530, num_classes=10,
                        cfg=cfg, seed=seed, device=device, shard=shard)


def make_synthetic(cfg: DataConfig, seed: int, device: torch.device, shard: Shard = Shard()) -> TensorImages:
    """Noisy images around one smooth random template per class: learnable, so tests can check accuracy.
    The data depend only on the data config (not the training seed)."""
    c, h, w = cfg.shape
    g = torch.Generator().manual_seed(1234)
    coarse = torch.randn(cfg.num_classes, c, max(1, h // 8), max(1, w // 8), generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, cfg.num_classes, (n,), generator=g)
        x = 128 + 40 * templates[y] + cfg.synthetic_noise * torch.randn(n, c, h, w, generator=g)
        return x.clamp_(0, 255).to(torch.uint8), y

    train, test = split(cfg.synthetic_train), split(cfg.synthetic_test)
    return TensorImages("synthetic", _subset(*train, cfg.train_subset), _subset(*test, cfg.test_subset),
                        mean=0.5, std=0.25, num_classes=cfg.num_classes, cfg=cfg, seed=seed, device=device,
                        generator={"seed": 1234, "signal": 40, "noise": cfg.synthetic_noise,
                                   "classes": cfg.num_classes}, shard=shard)
