"""VGG-11 split at its pooling layers: stage j is [maxpool] + the convs of group j.

The pool opens a stage rather than closing one, so each cached output is the full-resolution
result of the convs (what the auxiliary head should see), and tiny inputs (Fashion-MNIST's 28 px)
skip a pool once space has shrunk to 1 x 1.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cachetrain.config import ModelConfig
from cachetrain.models.chain import Chain

VGG11_GROUPS = [[64], [128], [256, 256], [512, 512], [512, 512]]  # widths at base width 64


def _stage(c_in: int, widths: list[int], pool: bool) -> Chain:
    layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return Chain(*layers)


def stage_factories(cfg: ModelConfig, in_channels: int, in_size: int) -> list[Callable[[], nn.Module]]:
    factories = []
    c, size = in_channels, in_size
    for j, group in enumerate(VGG11_GROUPS[: cfg.stages]):
        widths = [max(1, w * cfg.width // 64) for w in group]
        pool = j > 0 and size >= 2
        size = size // 2 if pool else size
        factories.append(lambda c_in=c, widths=widths, pool=pool: _stage(c_in, widths, pool))
        c = widths[-1]
    return factories
