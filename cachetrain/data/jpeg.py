"""The stage-0 JPEG pipeline on NVIDIA DALI, for image folders at ImageNet scale (`loader.backend`).

The external_source callback reads the JPEG bytes of batch b, `fn.decoders.image` decodes them (on the
GPU with device "mixed"), then random resized crop + flip + normalize for training, or resize + center
crop for evaluation and caching. A file the decoder fails on stops the pass with one DataError line
naming it (found among the batches handed out). Without a GPU, pipelines run CPU-only
(`device_id=None`); augmentation randomness comes from the pipeline's seed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cachetrain.data.images import bad_image_error, image_problem
from cachetrain.device import dali_device_id, require_dali
from cachetrain.source import epoch_order


class ImageBatches:
    """The external_source callback for image folders: encoded bytes and labels of batch b."""

    def __init__(self, files: list[str], labels: list[int], batch_size: int, seed: int, shuffle: bool,
                 first_epoch: int, start: int):
        self.files, self.labels, self.batch_size = files, np.asarray(labels, dtype=np.int64), batch_size
        self.seed, self.shuffle, self.first_epoch, self.start = seed, shuffle, first_epoch, start
        # the sample indices of the last few batches handed out: the pipeline runs ahead of its consumer
        # (prefetch_queue_depth), so a decode error is in one of these; `bad_file` finds which
        self.recent: deque[np.ndarray] = deque(maxlen=4)

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        n = len(self.files)
        order = epoch_order(self.seed, epoch, n) if self.shuffle else np.arange(n)
        first = (self.start if info.epoch_idx == 0 else 0) + info.iteration * self.batch_size
        if first >= n:
            raise StopIteration
        idx = order[first:first + self.batch_size]
        self.recent.append(idx)
        return [np.fromfile(self.files[i], dtype=np.uint8) for i in idx], self.labels[idx]

    def bad_file(self) -> tuple[str, str] | None:
        """(path, reason) of the first file of the recent batches that PIL cannot decode, if any."""

        for idx in self.recent:
            for i in idx:
                problem = image_problem(self.files[i])
                if problem is not None:
                    return self.files[i], problem
        return None


def image_batches(files: list[str], labels: list[int], size: int, train: bool, batch_size: int, seed: int,
                  epoch: int, start: int, device: torch.device, workers: int, flip: bool,
                  mean: tuple[float, ...], std: tuple[float, ...],
                  shuffle: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over an image folder split through DALI: decode (GPU 'mixed' on CUDA), then random
    resized crop + flip (train) or resize + center crop (eval), normalize, CHW float32."""
    require_dali()
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    gpu = device.type == "cuda"
    source = ImageBatches(files, labels, batch_size, seed, train if shuffle is None else shuffle, epoch, start)

    # reading encoded bytes is cheap next to decoding (DALI's own threads, or nvJPEG on the GPU), so the
    # callback runs in this process and needs no worker start per pass
    @pipeline_def(batch_size=batch_size, num_threads=max(2, workers), seed=seed * 7919 + epoch,
                  prefetch_queue_depth=2, device_id=dali_device_id(device))
    def pipeline():
        jpegs, y = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(images, size=(size, size))
            crop, mirror = (size, size), fn.random.coin_flip() if flip else 0
        else:
            images = fn.resize(images, resize_shorter=size * 8 // 7)
            crop, mirror = (size, size), 0
        x = fn.crop_mirror_normalize(images, crop=crop, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                     mean=[255 * m for m in mean], std=[255 * s for s in std])
        return x, y

    pipe = pipeline()
    pipe.build()
    try:
        for data in DALIGenericIterator(pipe, ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL):
            yield (data[0]["x"].to(device, non_blocking=True),
                   data[0]["y"].reshape(-1).to(device, non_blocking=True).long())
    except RuntimeError:
        # DALI reports a file it cannot decode as a multi-line pipeline error naming no file (and its own
        # log lines on stderr): name the file in one line when it is one of the batches handed out
        bad = source.bad_file()
        if bad is None:
            raise
        raise bad_image_error(*bad) from None


def folder_files(dataset) -> tuple[list[str], list[int]]:
    """(paths, labels) of a folder split (cachetrain.data.folder.ImageFiles, or a torchvision ImageFolder), in its
    own (sorted) order; the labels index the train split's class list."""
    return [str(Path(p)) for p, _ in dataset.samples], [int(t) for _, t in dataset.samples]
