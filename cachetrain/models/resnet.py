"""ResNet-18 split into stages: the stem, then each of the four residual groups.

Uses torchvision's BasicBlock; only the stem and the widths are ours, so the width can shrink for
tests and the stem can keep resolution on small images (3x3 stride 1, no max-pool, as is usual
for CIFAR-sized inputs) or follow ImageNet's 7x7 stride 2 + max-pool above 64 px. With activation
checkpointing only the stem recomputes its BN -> ReLU pair: torchvision's BasicBlock is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cachetrain.config import ModelConfig
from cachetrain.models.chain import Chain


def _stem(c_in: int, width: int, small: bool) -> Chain:
    if small:
        return Chain(nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    return Chain(nn.Conv2d(c_in, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))


def _group(c_in: int, width: int, stride: int, blocks: int = 2) -> nn.Sequential:
    from torchvision.models.resnet import BasicBlock, conv1x1  # torchvision costs seconds to import; only here

    downsample = None
    if stride != 1 or c_in != width:
        downsample = nn.Sequential(conv1x1(c_in, width, stride), nn.BatchNorm2d(width))
    layers = [BasicBlock(c_in, width, stride, downsample)]
    layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def stage_factories(cfg: ModelConfig, in_channels: int, in_size: int) -> list[Callable[[], nn.Module]]:
    w = cfg.width
    factories: list[Callable[[], nn.Module]] = [lambda: _stem(in_channels, w, small=in_size <= 64)]
    widths, strides = [w, 2 * w, 4 * w, 8 * w], [1, 2, 2, 2]
    c = w
    for width, stride in list(zip(widths, strides))[: cfg.stages - 1]:
        factories.append(lambda c_in=c, width=width, stride=stride: _group(c_in, width, stride))
        c = width
    return factories
