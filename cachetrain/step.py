"""The one training step, and the optimizer and learning-rate schedule it steps.

`train_step` (forward, loss, backward, optimizer step, scheduler step) is what training runs
(cachetrain.train.trainer), what the memory and FLOP counts measure (cachetrain.plan) and what every
benchmark that times a step calls (cachetrain.bench.tools, benchmarks/): so what they measure is what
training does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cachetrain.config import TrainConfig
from cachetrain.device import autocast


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int):
    """Stepped once per batch, so short runs (a few epochs per stage) still get a smooth schedule."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    if cfg.schedule == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.gamma)
    return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler=None, device: torch.device | None = None, amp: bool = False,
               channels_last: bool = False, loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of `model` on the batch (x, y): forward (bf16 autocast on CUDA when `amp`),
    cross-entropy on fp32 logits, backward (of the loss times `loss_scale`: this rank's weight under
    DDP, cachetrain.train.trainer.loss_scale_of), optimizer step and, when given, scheduler step. On CUDA
    with `channels_last` the batch is made channels-last first. Returns (loss, logits), the loss unscaled,
    still on the device and not synchronised; the caller sets train mode."""
    device = device or x.device
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    (loss if loss_scale == 1.0 else loss * loss_scale).backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss, logits
