"""Training one stage: plain train_one_epoch / evaluate functions over batches from any source.

The model trained at stage j is its block followed by its auxiliary head; everything before it is
either a cache (its batches come from the loader) or, for j = 0, the images. Time spent waiting
for the next batch is measured separately from the step itself, since the loader's speed is the
product's claim.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cachetrain.config import TrainConfig
from cachetrain.device import autocast
from cachetrain.faults import fault_point


class StageModel(nn.Module):
    def __init__(self, stage: nn.Module, head: nn.Module):
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x))


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Stepped once per batch, so short runs (a few epochs per stage) still get a smooth schedule."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif cfg.schedule == "step":
        factor = lambda step: cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochStats:
    """Running sums over the batches of one epoch; saved in mid-epoch checkpoints so a resumed epoch
    reports the same loss and accuracy as an uninterrupted one."""

    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0
    step_seconds: float = 0.0
    data_seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.samples)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.samples)

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, self.step_seconds + self.data_seconds)


def timed(batches: Iterable, stats: EpochStats) -> Iterator:
    """Yield from `batches`, adding the time spent waiting for each to stats.data_seconds."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stats.data_seconds += time.perf_counter() - t0
        yield item


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device, amp: bool = False, channels_last: bool = False,
                    stats: EpochStats | None = None,
                    on_step: Callable[[EpochStats], None] = lambda s: None) -> EpochStats:
    stats = stats or EpochStats()
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for x, y in timed(batches, stats):
        t0 = time.perf_counter()
        if channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # .item() syncs with the device once per step; the rich bar needs the live loss anyway
        stats.loss_sum += loss.item() * len(y)
        stats.correct += int((logits.argmax(1) == y).sum())
        stats.samples += len(y)
        stats.batches += 1
        stats.step_seconds += time.perf_counter() - t0
        fault_point("train_step")
        on_step(stats)
    return stats


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: torch.device, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true label) for every sample, in the order of `batches`."""
    model.eval()
    preds, labels = [], []
    for x, y in batches:
        with autocast(device, amp):
            preds.append(model(x).argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: bool = False) -> float:
    preds, labels = predict(model, batches, device, amp)
    return float((preds == labels).mean())
