"""ImageFolder datasets (a user's own data, ImageNet-style `train/` and `val/` trees) on the CPU path.

Images are decoded with PIL + torchvision transforms in a DataLoader with worker processes; training
uses random-resized-crop + flip, evaluation and the caching pass resize + center-crop. The shuffle
order is drawn from (seed, epoch) and handed to the DataLoader as an explicit index list, so it is the
same order the tensor datasets and the cache loader would use, and resumable mid-epoch.

What the tree must look like (checked when the dataset is opened, each failure one DataError line):
- The class list is the sorted names of the folders in `train/` (`FolderImages.classes`); the labels
  of both splits are indices into that one list, so a class has the same label in train and val.
  A `val/` class folder that `train/` lacks is refused; a train class with no `val/` folder is
  allowed with a warning (it is trained, not evaluated).
- Every class folder holds at least one image; every file in it (subfolders included, names starting
  with "." ignored) has an image extension.
- Images that cannot be decoded (truncated, not an image, unreadable) stop the run with a DataError
  naming the file when a batch reaches them, from DataLoader workers too; with
  `data.skip_bad_images: true` they are found when the dataset is opened instead, left out and
  counted (`FolderImages.skipped_files`, a printed line, the dataset fingerprint).

Splits: the `val/` tree is the "test" split (what ImageNet calls val is only reported); the "val" split
(`data.val_samples`, cachetrain.data.split) is held out of the `train/` files, after data.train_subset
and after skipped files are left out, and read with the evaluation transforms.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cachetrain.stop import ignore_in_worker
from cachetrain.config import DataConfig
from cachetrain.data.images import IMAGE_EXTENSIONS, FIX, bad_image_error, image_problem, shown
from cachetrain.data.jpeg import folder_files, image_batches
from cachetrain.data.split import hold_out
from cachetrain.device import dali_available, require_dali
from cachetrain.dist import Shard
from cachetrain.errors import ConfigError, DataError
from cachetrain.source import Batch, epoch_order, fingerprint, image_shares, train_plan

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


# not followed: a loop, or a folder outside the class folder, would add samples the class does not hold
FOLDER_LINK = "a link to a folder ({target}), which is not followed"


def _class_files(class_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every file under a class folder, in torchvision ImageFolder's order (folders sorted by path, files by
    name; names starting with "." left out), and (path, why) of each entry that is not a sample's file.

    What a link means: a link to a file is followed (the file is a sample of the class folder the link is
    in); a link to a folder is never followed, wherever it leads (back into the tree, a loop, or outside the
    class folder); a broken link, or anything that is not a regular file (a FIFO would block the reader), is
    not a file. The class folder itself may be a link (a class assembled elsewhere)."""
    found: list[tuple[str, list[str]]] = []
    refused: list[tuple[str, str]] = []

    def visit(folder: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as e:  # os.walk would leave an unreadable folder out without a word
            refused.append((folder, f"cannot list this folder ({e.strerror})"))
            return
        names = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    visit(e.path)
                elif e.is_symlink() and e.is_dir():
                    refused.append((e.path, FOLDER_LINK.format(target=f"-> {_short(os.readlink(e.path))}")))
                elif e.is_file():  # a regular file, or a link to one
                    names.append(e.name)
                elif e.is_symlink() and not os.path.exists(e.path):
                    refused.append((e.path, f"a broken link (-> {_short(os.readlink(e.path))})"))
                else:
                    refused.append((e.path, "not a regular file"))
            except OSError as err:
                refused.append((e.path, f"cannot read it ({err.strerror})"))
        found.append((folder, names))

    visit(str(class_dir))
    files = [os.path.join(folder, f) for folder, names in sorted(found) for f in sorted(names)]
    return files, sorted(refused)


def _short(text: str, most: int = 40) -> str:
    return text if len(text) <= most else f"...{text[-most:]}"


def _real_files(class_dir: Path, files: list[str]) -> list[str]:
    """The real path of each file: the class folder's, resolved once, joined with the file's path below it
    (no folder link is followed below it), except for file links, which are resolved each."""
    real_class = os.path.realpath(class_dir)
    return [os.path.realpath(f) if os.path.islink(f) else os.path.join(real_class, os.path.relpath(f, class_dir))
            for f in files]


class ImageFiles(Dataset):
    """(path, label) samples, decoded with PIL. A file that fails to decode is not raised here: in a
    DataLoader worker the exception would reach the main process as a multi-line traceback. The sample
    comes back as zeros with label -1 - index instead, and `FolderImages` names the file."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform, size: int):
        self.samples, self.classes, self.transform, self.size = samples, classes, transform, size
        self.targets = [t for _, t in samples]
        self.class_to_idx = {c: i for i, c in enumerate(classes)}

    @property
    def imgs(self) -> list[tuple[str, int]]:  # torchvision's name
        return self.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, target = self.samples[i]
        try:
            with Image.open(path) as im:
                im.load()  # decode all of it now: PIL notices a truncated file only at the end
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - reported by the main process, see the class docstring
            return torch.zeros(3, self.size, self.size), -1 - i
        return self.transform(img), target


def _subset(samples: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """Keep n samples spread evenly over the (class-sorted) file list, so every class stays represented."""
    if n and n < len(samples):
        keep = np.linspace(0, len(samples) - 1, n).round().astype(int)
        samples = [samples[i] for i in keep]
    return samples


class FolderImages:
    def __init__(self, cfg: DataConfig, seed: int, device: torch.device, workers: int, backend: str = "auto",
                 shard: Shard = Shard()):
        from torchvision import transforms as T

        root = cfg.resolved_root
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"data.root: {root / split} is not a directory; an imagefolder dataset needs "
                                f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        self.root = root
        size = cfg.image_size
        self.train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip() if cfg.flip else T.Identity(),
                                   T.ToTensor(), T.Normalize(MEAN, STD)])
        self.eval_tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
        # one class list for both splits: label i is classes[i] in train and in val (ImageFolder would number
        # each tree's folders on its own, and a val/ with one folder more would shift every val label)
        self.classes: list[str] = _class_folders(root / "train")
        if not self.classes:
            raise DataError(f"data.root: {root / 'train'} has no class folders; expected {root}/train/<class>/*.jpg")
        val_classes = _class_folders(root / "val")
        extra = sorted(set(val_classes) - set(self.classes))
        self.missing_val_classes: list[str] = sorted(set(self.classes) - set(val_classes))
        if extra:
            lacks = f"; it lacks {_names(self.missing_val_classes)}" if self.missing_val_classes else ""
            raise DataError(f"data.root: {root / 'val'} has class folders that {root / 'train'} does not: "
                            f"{_names(extra)}{lacks}; val/ needs the class names of train/, whose sorted folder "
                            f"names are the labels")
        if self.missing_val_classes:
            print(f"warning: data.root: {root / 'val'} has no folder for {len(self.missing_val_classes)} of "
                  f"{len(self.classes)} train classes ({_names(self.missing_val_classes)}); they are trained on "
                  f"but not in the test accuracy", flush=True)
        self.skipped_files: list[tuple[str, str]] = []  # (path relative to data.root, reason), scan order
        train = self._scan(root / "train", cfg.train_subset, cfg.skip_bad_images)
        test = self._scan(root / "val", cfg.test_subset, cfg.skip_bad_images, present=set(val_classes))
        if self.skipped_files:
            path, reason = self.skipped_files[0]
            print(f"data: skipped {len(self.skipped_files)} bad files under {root} (data.skip_bad_images), "
                  f"first {path}: {reason}", flush=True)
        for split, samples in (("train", train), ("val", test)):
            if not samples:
                raise DataError(f"data.root: {root / split} holds no images; expected {root / split}/<class>/*.jpg")
        self.split = hold_out(cfg, len(train))  # the "val" split: files held out of train/
        files = [str(Path(p).relative_to(root)) for p, _ in train + test]
        val = [train[i] for i in self.split.val]
        train = [train[i] for i in self.split.train]
        train_ds = ImageFiles(train, self.classes, self.train_tf, size)
        train_eval = copy.copy(train_ds)  # the same file list (scanned once), evaluation transforms
        train_eval.transform = self.eval_tf
        self._sets = {"train": train_ds, "train_eval": train_eval,
                      "val": ImageFiles(val, self.classes, self.eval_tf, size),
                      "test": ImageFiles(test, self.classes, self.eval_tf, size)}
        self.num_classes = len(self.classes)
        self.sample_shape = (3, size, size)
        self.seed, self.device, self.workers, self.shard = seed, device, workers, shard
        self.size, self.flip_aug = size, cfg.flip
        if backend == "dali":
            require_dali()
        self.use_dali = backend == "dali" or (backend == "auto" and device.type == "cuda" and dali_available()
                                                and shard.world == 1)
        if self.use_dali and shard.world > 1:
            raise ConfigError("loader.backend: expected 'numpy' under torchrun (the DALI image pipeline reads the whole "
                              f"training split, not one rank's share), got {backend!r}")
        # the classes are the label space; the file list leaves out skipped files, so what was skipped
        # is part of the fingerprint as well, and so is which of train/'s files are held out for validation
        self.fingerprint = fingerprint({"dataset": "imagefolder", "classes": self.classes, "files": fingerprint(files),
                                        "size": size, "eval": "resize8/7-centercrop", "mean": MEAN, "std": STD,
                                        **self.split.fingerprint_keys()})

    def _scan(self, split_dir: Path, subset: int, skip: bool, present: set[str] | None = None) -> list[tuple[str, int]]:
        """(path, label) of the split's images, subset applied; bad files raise DataError or, with `skip`,
        are added to self.skipped_files."""
        samples = []
        seen: dict[str, str] = {}  # real path -> the sample file that is it: no file is a sample twice
        self._check_class_links(split_dir, present)
        for label, name in enumerate(self.classes):
            if present is not None and name not in present:
                continue
            files, refused = _class_files(split_dir / name)
            for f, why in refused:  # folder links, broken links, FIFOs, unreadable folders
                self._bad(f, why, skip)
            images = []
            for f, real in zip(files, _real_files(split_dir / name, files)):
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    self._bad(f, "not an image file name", skip, f"not an image file (expected a name ending in "
                                                                  f"{', '.join(IMAGE_EXTENSIONS)})")
                elif real in seen:
                    self._bad(f, f"the same file as {shown(seen[real], self.root)} (a link): a file is one sample",
                              skip)
                else:
                    seen[real] = f
                    images.append(f)
            if not images:
                raise DataError(f"data.root: class folder {shown(split_dir / name)} holds no images; add images to "
                                f"it or remove the folder")
            samples += [(f, label) for f in images]
        samples = _subset(samples, subset)
        if skip and samples:
            # Decided here, once, so the sample set is the same in every epoch and every command, and the
            # fingerprint says what was left out. Only with skip_bad_images: this decodes every image (at 1/8
            # scale), which for ImageNet is minutes of CPU on each command that opens the data; without it a
            # bad file stops the run, naming the file, when a batch reads it. Only the files the run uses
            # (after data.train_subset/test_subset) are decoded.
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = min(32, cpus)
            with ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
                problems = list(pool.map(lambda s: image_problem(s[0], fast=True), samples, chunksize=64))
            before = {label for _, label in samples}
            for (path, _), problem in zip(samples, problems):
                if problem is not None:
                    self.skipped_files.append((os.path.relpath(path, self.root), problem))
            samples = [s for s, problem in zip(samples, problems) if problem is None]
            emptied = sorted(before - {label for _, label in samples})
            if emptied:
                raise DataError(f"data.root: no image of class folder {split_dir / self.classes[emptied[0]]} could "
                                f"be decoded (data.skip_bad_images left them all out); replace them or remove the "
                                f"folder")
        return samples

    def _bad(self, path: str, why: str, skip: bool, refusal: str | None = None) -> None:
        """A file or folder that is not a sample: refused in one line, or with `skip` left out and counted."""
        if not skip:
            raise DataError(f"data.root: {shown(path)}: {refusal or why}; {FIX}")
        self.skipped_files.append((os.path.relpath(path, self.root), why))

    def _check_class_links(self, split_dir: Path, present: set[str] | None) -> None:
        """A class folder may be a link, but not to a folder another class folder of the split is, holds or
        is in, nor to one holding the split: its files would be samples twice, under two labels."""
        split_real = os.path.realpath(split_dir)
        real = {name: os.path.realpath(split_dir / name) for name in self.classes
                if present is None or name in present}
        for name, folder in real.items():
            if os.path.islink(split_dir / name) and Path(split_real).is_relative_to(folder):
                raise DataError(f"data.root: {shown(split_dir / name)}: a link to a folder holding "
                                f"{shown(split_dir, self.root)} itself; a class folder holds the images of one class")
            for other, other_folder in real.items():
                if other != name and (Path(folder).is_relative_to(other_folder) or folder == other_folder):
                    link = name if os.path.islink(split_dir / name) else other
                    raise DataError(f"data.root: {shown(split_dir / link)}: a link to the folder of class "
                                    f"{other if link == name else name} (or into it): its files would be samples "
                                    f"of two classes; give each class a folder of its own")

    def files(self, split: str) -> list[str]:
        """The image file of each sample of a split ("train", "val" or "test"), in sample order."""
        return [path for path, _ in self._sets[split].samples]

    def metadata(self) -> dict:
        """What a run should record about its data: label i is classes[i]; the files left out and why; which
        training files are held out for validation."""
        return {"classes": self.classes, "missing_val_classes": self.missing_val_classes,
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files],
                "val_split": self.split.metadata()}

    def num_samples(self, split: str) -> int:
        return len(self._sets[split])

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._sets[split].targets, dtype=np.int64)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_samples("train") // batch_size)

    def _load(self, ds, indices, batch_size: int, seed: int, batches: list | None = None) -> Iterator[Batch]:
        """`indices` batch_size at a time, or the given `batches` (lists of sample indices)."""
        batches = batches if batches is not None else [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        loader = DataLoader(ds, batch_sampler=batches, num_workers=self.workers, worker_init_fn=ignore_in_worker,
                            generator=torch.Generator().manual_seed(seed), pin_memory=self.device.type == "cuda")
        for x, y in loader:
            if (y < 0).any():  # a file that did not decode (ImageFiles.__getitem__): name it, in one line
                path = ds.samples[-1 - int(y[y < 0][0])][0]
                raise bad_image_error(path, image_problem(path) or "could not be decoded while loading")
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _dali(self, name: str, train: bool, batch_size: int, epoch: int, start: int) -> Iterator[Batch]:
        files, labels = folder_files(self._sets[name])
        return image_batches(files, labels, self.size, train, batch_size, self.seed, epoch, start, self.device,
                             self.workers, self.flip_aug, MEAN, STD)

    def share_sizes(self, epoch: int) -> list[int]:
        return image_shares(self.num_samples("train"), self.shard)

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0, augment: bool = True) -> Iterator[Batch]:
        name = "train" if augment else "train_eval"
        if self.use_dali and augment:
            yield from self._dali("train", True, batch_size, epoch, start_batch * batch_size)
            return
        n = self.num_samples("train")
        mine = epoch_order(self.seed, epoch, n)[self.shard.rank::self.shard.world]
        plan = [b.tolist() for b in train_plan(mine, batch_size, self.steps_per_epoch(batch_size), self.shard,
                                               n // self.shard.world)]
        # the workers' augmentation seeds come from (seed, epoch, start_batch[, rank]): resuming mid-epoch
        # repeats the order exactly; the random crops after the resume point are fresh draws
        key = (self.seed, epoch, start_batch) + ((self.shard.rank,) if self.shard.world > 1 else ())
        yield from self._load(self._sets[name], [], batch_size, seed=hash(key) & 0x7FFFFFFF,
                              batches=plan[start_batch:])

    def augmented_batches(self, batch_size: int, start: int, view: int) -> Iterator[Batch]:
        """The training split in sample order under the training transforms (a cache view)."""
        if self.use_dali:
            files, labels = folder_files(self._sets["train"])
            yield from image_batches(files, labels, self.size, True, batch_size, self.seed + view, 0, start,
                                     self.device, self.workers, self.flip_aug, MEAN, STD, shuffle=False)
            return
        yield from self._load(self._sets["train"], list(range(start, self.num_samples("train"))), batch_size,
                              seed=hash((self.seed, view, start)) & 0x7FFFFFFF)

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        name = "train_eval" if split == "train" else split
        if start >= len(self._sets[name]):  # an empty val split (or nothing left): no pipeline to build
            return
        if self.use_dali:
            yield from self._dali(name, False, batch_size, 0, start)
            return
        ds = self._sets[name]
        yield from self._load(ds, list(range(start, len(ds))), batch_size, seed=0)
