"""Measuring a training step: the memory it holds and the FLOPs it does.

Memory is accounted two ways in one step, without sampling anything:
- the count: the bytes of every tensor autograd saves for backward (seen through
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded) plus
  parameters, gradients, optimizer state and the input batch (when nothing saved it already). It
  leaves out what the backward makes and frees as it goes (each layer's input and output gradients,
  recomputed activations), which on these shallow stages is a third to a half of the peak;
- the live peak (`LiveBytes`): the most bytes held at once by every tensor storage alive during the
  step, tracked op by op (a TorchDispatchMode adds each new storage's bytes and a finalizer takes
  them off when the storage is freed). It is the allocator's peak less its rounding and slack and
  less the scratch a kernel allocates inside itself.
On CUDA the allocator's own peak is read too. Both run on meta tensors (a model built under
`with torch.device("meta"):`) and on fake ones (torch._subclasses.FakeTensorMode, which also takes
CPU autocast), where nothing is allocated whatever the size: storages are told apart by identity
there, since their data pointers are all 0. FLOPs come from torch.utils.flop_counter. Seconds
(`step_seconds`, `forward_seconds`: the planner's measured per-stage times) are the fastest of a few
calls after a warm-up. Every figure runs the trainer's own step (`cachetrain.step.train_step`),
so it counts what training does.
"""

from __future__ import annotations

import resource
import time
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from cachetrain.device import autocast
from cachetrain.step import train_step


@dataclass
class StepMemory:
    saved_bytes: int  # activations autograd keeps for backward
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None
    input_bytes: int = 0  # the input batch, when no op saved it (then it is in saved_bytes)
    live_peak: int | None = None  # the most bytes live storages held at once during the step (LiveBytes)

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.input_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _storage_key(t: torch.Tensor) -> int:
    """Which storage a tensor views: its data pointer, or for meta and fake tensors (all at address 0) the
    storage object's own identity (alive as long as anything holds the storage)."""
    storage = t.untyped_storage()
    return storage._cdata if storage.device.type == "meta" else storage.data_ptr()


class LiveBytes(TorchDispatchMode):
    """While active: `now`, the bytes of every storage it has seen that is still alive, and `peak`, the
    most `now` has been. Every op's outputs are seen as they are made; `hold` adds storages that exist
    already (parameters, the batch). A storage's Python object lives exactly as long as the storage
    (torch preserves it), so a finalizer on it marks the free."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._seen: set[int] = set()

    def hold(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._seen:
                continue
            n = storage.nbytes()
            self._seen.add(key)
            self.now += n
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.hold(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
        return out


def step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                amp: bool = False, warmup: bool = False) -> StepMemory:
    """One forward + backward + optimizer step of `model` on (x, y), with its memory accounted. Under an
    autocast context of the caller's the count sees the casts autocast makes (on the CPU too). With
    `warmup`, the step starts as every step of training after the first does: with the last step's
    gradients (zeros here) and the optimizer's state allocated (by one untracked optimizer step on them,
    which moves the weights as weight decay would: a measurement's model only)."""
    model.train()
    if warmup:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    params = {_storage_key(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params:
            saved[key] = max(saved.get(key, 0), _nbytes(t))
        return t

    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    live = LiveBytes()
    live.hold(x, y, *model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()),
              *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)))
    # backward and the optimizer step save nothing for a graph, so the hooks see the forward's tensors only
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), live:
        train_step(model, x, y, optimizer, amp=amp)
    peak_alloc = peak_reserved = None
    if cuda:
        torch.cuda.synchronize()
        peak_alloc, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v))
    # the batch's own bytes: x may be a slice of a larger resident tensor
    input_bytes = 0 if _storage_key(x) in saved else x.numel() * x.element_size()
    return StepMemory(sum(saved.values()), param_bytes, grad_bytes, opt_bytes, peak_alloc, peak_reserved,
                      input_bytes, live.peak)


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


def _timed(run, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` calls of run() after one warm-up, in seconds (CUDA synchronised): on a shared
    machine the fastest is the one least disturbed."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(max(1, repeats)))


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False, channels_last: bool = False,
                 repeats: int = 2) -> float:
    """Seconds one training step of `model` on the batch (x, y) takes on its device: the trainer's own step,
    with SGD and momentum at a zero learning rate, so the weights stay as they were."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    seconds = _timed(lambda: train_step(model, x, y, optimizer, amp=amp, channels_last=channels_last), x.device,
                     repeats)
    model.zero_grad(set_to_none=True)
    return seconds


def forward_seconds(module: nn.Module, x: torch.Tensor, amp: bool = False, repeats: int = 2) -> float:
    """Seconds one forward of `module` on x takes in eval mode without autograd (evaluations, recomputing
    frozen stages, caching passes), on x's device."""
    module.eval()
    with torch.no_grad(), autocast(x.device, amp):
        return _timed(lambda: module(x), x.device, repeats)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
