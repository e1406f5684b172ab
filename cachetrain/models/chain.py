"""Layers that let a stage hold less memory in training, with the same values and gradients.

A conv-BN-ReLU stage keeps about three maps of its own size for the backward: the conv's input, the
BN's input (the conv's output) and the ReLU's output (which the next conv or pool saves again).
`Chain` is an `nn.Sequential` (same children, same state_dict keys) that, when its `recompute` flag
is on, runs each BN -> ReLU pair, together with the layer right after it when that layer saves its
own input (a conv, a max-pool, a linear layer), under `torch.utils.checkpoint` (non-reentrant). The
pair's output is then not kept: the backward recomputes BN and ReLU from the saved conv output,
which costs two elementwise passes and no conv (non-reentrant checkpointing stops recomputing as
soon as the tensors the backward needs are back, before the conv kernel runs). The same goes for a
space-to-depth (PixelUnshuffle) and the conv after it: the conv would keep the rearranged copy of
the stage's input, which the backward remakes from the input itself (kept anyway) by one copy. BN's running
statistics are updated by the forward only: the recomputation normalises with the batch's statistics
again (the same values) with momentum 0, which leaves the running buffers as they are.

A pair at the very end of a chain (a stage's output) only helps when whatever reads that output
does not save it again: `AvgPool` is adaptive average pooling whose backward needs the input's
shape, not its values (nn.AdaptiveAvgPool2d keeps the whole input for the backward), so the `sr`
head and every head's final pool read a stage's output without keeping it.

`configure(module, checkpoint_activations, inplace_relu)` sets both options on every layer of a
built module; neither changes the parameters or their initialisation.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# layers whose backward needs their input: recomputing them inside a pair's segment means the pair's
# output need not be kept for them
_SAVES_INPUT = (nn.Conv2d, nn.MaxPool2d, nn.Linear)


class Chain(nn.Sequential):
    """nn.Sequential that can recompute its BN -> ReLU pairs in the backward (see the module docstring)."""

    recompute = False  # a class default, so a Chain unpickled or built elsewhere starts off

    def segments(self) -> list[tuple[int, int, bool]]:
        """(start, stop, recomputed) runs of children that cover the chain in order."""
        layers, out, i, plain = list(self), [], 0, 0
        saves_input = lambda at: at < len(layers) and isinstance(layers[at], _SAVES_INPUT)  # noqa: E731
        while i < len(layers):
            pair = isinstance(layers[i], nn.BatchNorm2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            psi = isinstance(layers[i], nn.PixelUnshuffle) and saves_input(i + 1)
            if pair or psi:
                stop = i + 2 if psi else i + 3 if saves_input(i + 2) else i + 2
                if plain < i:
                    out.append((plain, i, False))
                out.append((i, stop, True))
                i = plain = stop
            else:
                i += 1
        if plain < len(layers):
            out.append((plain, len(layers), False))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute and self.training and torch.is_grad_enabled()):
            return super().forward(x)
        for start, stop, recomputed in self.segments():
            if not recomputed:
                for layer in self[start:stop]:
                    x = layer(x)
                continue
            state = {"recomputing": False}
            # no RNG in BN, ReLU, conv or pooling, so no RNG state to stash and restore
            x = checkpoint(self._segment, x, start, stop, state, use_reentrant=False, preserve_rng_state=False,
                           context_fn=lambda state=state: (nullcontext(), _flag(state)))
        return x

    def _segment(self, x: torch.Tensor, start: int, stop: int, state: dict) -> torch.Tensor:
        for layer in self[start:stop]:
            if state["recomputing"] and isinstance(layer, nn.BatchNorm2d) and layer.training:
                # the forward already moved the running statistics: momentum 0 leaves them as they are, and
                # the op saves the same tensors as in the forward (checkpoint checks that it does)
                x = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True, 0.0,
                                 layer.eps)
            else:
                x = layer(x)
        return x


@contextmanager
def _flag(state: dict):
    state["recomputing"] = True
    try:
        yield
    finally:
        state["recomputing"] = False


class _PoolKeepingShape(torch.autograd.Function):
    """adaptive_avg_pool2d whose backward keeps the input's shape, dtype and layout, not its values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        return F.adaptive_avg_pool2d(x, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        # the backward kernel reads only the input's sizes and layout: an uninitialised stand-in, freed
        # as soon as the gradient is made, replaces the map nn.AdaptiveAvgPool2d would have kept
        stand_in = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=layout)
        return torch.ops.aten._adaptive_avg_pool2d_backward(grad, stand_in), None


class AvgPool(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d that does not keep its input for the backward (same values and gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _PoolKeepingShape.apply(x, self.output_size)


def configure(module: nn.Module, checkpoint_activations: bool = False, inplace_relu: bool = True) -> nn.Module:
    """Turn recomputation of BN -> ReLU pairs and in-place ReLU on or off in every layer of `module`."""
    for m in module.modules():
        if isinstance(m, Chain):
            m.recompute = checkpoint_activations
        if isinstance(m, nn.ReLU):
            m.inplace = inplace_relu
    return module
