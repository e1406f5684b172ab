"""What the planner plans with: each stage's cost table and the run's workload.

`StageCost` is one stage as the planner sees it: the FLOPs of its block, of a training step and of an
evaluation (block + head), its output shape and bytes per stored sample for every storage format
(`sample_bytes`, from cachetrain/cache/formats.py), and, for the formats whose zstd ratio was measured
(cachetrain/plan/compression.py), the bytes a sample takes on disk after zstd (`stored_bytes`). A
format missing from `stored_bytes` is stored raw (`cache.codec: none`, or a ratio nobody measured).

`Workload` is how much data each stage sees: training samples per epoch, the samples evaluated every
epoch (test and validation splits, and the plain subset of the training split that measures the
train - val gap: cachetrain/train/trainer.py `epoch_diagnostics`), epochs per stage, cached views.
`workload_of` builds it from a config and its dataset the way a greedy run will use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cachetrain.cache.formats import FORMATS
from cachetrain.config import Config
from cachetrain.models.factory import network, stage_model
from cachetrain.plan.profile import forward_flops, train_step_flops

TRAIN_EVAL_DEFAULT = 5000  # plain training samples evaluated each epoch when there is no validation split


@dataclass(frozen=True)
class StageCost:
    stage: int
    out_shape: tuple[int, int, int]
    forward_flops: float  # per sample, the block alone (what recomputing it costs)
    train_flops: float  # per sample, one training step of block + head (forward + backward): the same in every plan
    sample_bytes: dict[str, int]  # per storage dtype, uncompressed
    eval_flops: float = 0.0  # per sample, a forward of block + head (each epoch's test evaluation): every plan
    # per storage dtype whose chunks are zstd-compressed: bytes one sample takes on disk (measured ratio)
    stored_bytes: dict[str, float] = field(default_factory=dict)

    def stored(self, dtype: str) -> float:
        """Bytes one sample of this stage's cache takes on disk (and is read at) in `dtype`."""
        return self.stored_bytes.get(dtype, self.sample_bytes[dtype])

    def compressed(self, dtype: str) -> bool:
        """Whether this stage's chunks in `dtype` are zstd-compressed: a reader decompresses every one."""
        return dtype in self.stored_bytes


@dataclass(frozen=True)
class Workload:
    train: int  # training samples
    test: int  # evaluated every epoch: the test split and the validation split
    epochs: int  # per stage
    views: int = 1  # cached training views (disk and caching passes scale with it)
    train_eval: int = 0  # plain training samples evaluated every epoch (the train - val gap), read like the test
    eval_passes: int = 1  # passes over the data each epoch's evaluation starts (test, validation, training subset)
    eval_stores: int = 1  # the test split's store, and the validation split's where there is one

    @property
    def stores(self) -> int:
        """Stores a caching pass writes, one pass over the data each: every training view, val and test."""
        return self.views + self.eval_stores


def sample_bytes(out_shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of one stored sample of shape `out_shape`, per storage format (cachetrain/cache/formats.py)."""
    return {name: fmt.sample_bytes(out_shape) for name, fmt in FORMATS.items()}


def input_shape(cfg: Config, image_size: int | None = None) -> tuple[int, int, int]:
    d = cfg.data
    c, h, w = {"fmnist": (1, 28, 28), "imagefolder": (3, d.image_size, d.image_size), "synthetic": tuple(d.shape)}[d.name]
    return (c, image_size, image_size) if image_size else (c, h, w)


def stage_costs(cfg: Config, in_shape: tuple[int, int, int], num_classes: int = 10) -> list[StageCost]:
    net = network(cfg, in_shape)
    costs = []
    for j, stage in enumerate(net.stages):
        x = torch.zeros(2, *net.in_shapes[j])  # batch 2: BN in training mode needs more than one value
        # what the trainer steps (a checkpointed stage recomputes its forward in the backward)
        model = stage_model(cfg, net, j, cfg.model.k, num_classes,
                            checkpoint_activations=cfg.stage_train(j).checkpoint_activations)
        costs.append(StageCost(j, net.out_shapes[j], forward_flops(stage, x) / 2,
                               train_step_flops(model, x, torch.zeros(2, dtype=torch.long)) / 2,
                               sample_bytes(net.out_shapes[j]), forward_flops(model, x) / 2))
    return costs


def with_compression(costs: list[StageCost], ratios: dict[str, list[float]]) -> list[StageCost]:
    """The cost table with each stage's stored bytes per sample: raw bytes over the zstd ratio measured (or
    given) for that format and stage (`ratios[dtype][j]`, raw / stored)."""
    return [replace(c, stored_bytes={d: c.sample_bytes[d] / r[c.stage] for d, r in ratios.items()
                                     if d in c.sample_bytes and c.stage < len(r)}) for c in costs]


def recompute_flops(costs: list[StageCost], a: int, j: int) -> float:
    """Per-sample FLOPs to produce stage j's input from stage a's output (a = -1: the images)."""
    return sum(c.forward_flops for c in costs[a + 1:j])


def workload_of(cfg: Config, n_train: int, n_test: int, n_val: int = 0) -> Workload:
    """The workload of a greedy run of `cfg` on splits of these sizes: every epoch trains on the training
    split and evaluates the validation and test splits and a plain subset of the training split as large as
    the validation split (5,000 samples without one), as cachetrain/train/trainer.py does."""
    train_eval = min(n_train, n_val or TRAIN_EVAL_DEFAULT)
    # the training subset is read in one pass when it is the whole split, else batch by batch from spread starts
    subset_passes = 1 if train_eval >= n_train else -(-train_eval // (2 * cfg.train.batch_size))
    eval_stores = (1 if n_val else 0) + 1
    return Workload(n_train, n_test + n_val, cfg.train.epochs, cfg.cache.views, train_eval,
                    eval_stores + subset_passes, eval_stores)
