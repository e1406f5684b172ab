"""Measuring a training step: the memory it holds and the FLOPs it does.

Memory on the CPU is counted, not sampled: the bytes of every tensor autograd saves for backward
(seen through `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded)
plus parameters, gradients and optimizer state. That is what a GPU would have to hold at the peak of
a step (less the allocator's slack), so stage-vs-end-to-end ratios computed here carry over. On
CUDA the allocator's own peak is read instead. FLOPs come from torch.utils.flop_counter. Both run
the trainer's own step (`cachetrain.train.trainer.train_step`), so they count what training does.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cachetrain.train.trainer import train_step


@dataclass
class StepMemory:
    saved_bytes: int  # activations autograd keeps for backward
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                amp: bool = False) -> StepMemory:
    """One forward + backward + optimizer step of `model` on (x, y), with its memory accounted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.device.type != "meta":
            saved[ptr] = max(saved.get(ptr, 0), _nbytes(t))
        return t

    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    # backward and the optimizer step save nothing for a graph, so the hooks see the forward's tensors only
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, x, y, optimizer, amp=amp)
    peak_alloc = peak_reserved = None
    if cuda:
        torch.cuda.synchronize()
        peak_alloc, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v))
    return StepMemory(sum(saved.values()), param_bytes, grad_bytes, opt_bytes, peak_alloc, peak_reserved)


def forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (eval mode, no grad) on the batch x."""
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def train_step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step on the batch (x, y): forward + backward (the optimizer's elementwise
    update counts none). Runs the step with a zero learning rate, so the weights stay as they were."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
