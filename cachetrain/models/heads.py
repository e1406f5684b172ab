"""Auxiliary heads: the small classifier that gives stage j its own loss.

`conv` is Belilovsky et al.'s auxiliary problem of depth k: k-1 conv3x3-BN-ReLU layers at the stage's
resolution, average pooling to 2x2, then a linear layer (k=1 is pool + linear). Its convs run at full
resolution, so for early stages of an ImageNet-sized net the head, not the block, dominates memory.
`sr` follows DGL's "MLP-SR" idea: average-pool space by 4 per side first, then k-1 1x1 conv-BN-ReLU
layers, pool to 2x2 and a linear layer; much cheaper in memory and FLOPs.

Heads are `Chain`s and pool with `AvgPool` (cachetrain.models.chain): the same layers and values as an
nn.Sequential of nn.AdaptiveAvgPool2d, but a pool does not keep the stage's output for its backward,
and with activation checkpointing on the BN -> ReLU pairs are recomputed in the backward.
"""

from __future__ import annotations

import math

from torch import nn

from cachetrain.models.chain import AvgPool, Chain


def conv_head(in_channels: int, k: int, width: int, num_classes: int, bn: bool = True) -> Chain:
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(k - 1):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=not bn)]
        layers += [nn.BatchNorm2d(width)] if bn else []
        layers += [nn.ReLU(inplace=True)]
        c = width
    layers += [AvgPool(2), nn.Flatten(), nn.Linear(4 * c, num_classes)]
    return Chain(*layers)


def sr_head(in_channels: int, k: int, width: int, num_classes: int, spatial: int, bn: bool = True) -> Chain:
    reduced = max(2, math.ceil(spatial / 4))
    layers: list[nn.Module] = [AvgPool(reduced)]
    c = in_channels
    for _ in range(k - 1):
        layers += [nn.Conv2d(c, width, 1, bias=not bn)]
        layers += [nn.BatchNorm2d(width)] if bn else []
        layers += [nn.ReLU(inplace=True)]
        c = width
    layers += [AvgPool(2), nn.Flatten(), nn.Linear(4 * c, num_classes)]
    return Chain(*layers)


def build_head(kind: str, in_shape: tuple[int, int, int], k: int, width: int, num_classes: int,
               bn: bool = True) -> Chain:
    c, h, _ = in_shape
    width = width or c
    if kind == "conv":
        return conv_head(c, k, width, num_classes, bn)
    if kind == "sr":
        return sr_head(c, k, width, num_classes, h, bn)
    raise ValueError(f"unknown auxiliary head {kind!r}; expected 'conv' or 'sr'")
