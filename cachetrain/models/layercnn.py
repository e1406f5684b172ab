"""Belilovsky et al.'s layerwise CNN: every stage is [space-to-depth] -> conv3x3 -> BN -> ReLU.

Downsampling is the invertible space-to-depth map psi (C x H x W -> 4C x H/2 x W/2, torch's
PixelUnshuffle), after which the conv maps 4C -> 2C, so the width doubles at each downsampling
stage while no information is thrown away before the learned layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cachetrain.config import ModelConfig
from cachetrain.models.chain import Chain


def _stage(c_in: int, c_out: int, psi: bool, bn: bool) -> Chain:
    layers: list[nn.Module] = [nn.PixelUnshuffle(2)] if psi else []
    layers += [nn.Conv2d(4 * c_in if psi else c_in, c_out, 3, padding=1, bias=not bn)]
    layers += [nn.BatchNorm2d(c_out)] if bn else []
    layers += [nn.ReLU(inplace=True)]
    return Chain(*layers)


def stage_factories(cfg: ModelConfig, in_channels: int) -> list[Callable[[], nn.Module]]:
    factories = []
    c = in_channels
    for j in range(cfg.stages):
        psi = (cfg.input_psi or j in cfg.downsample) if j == 0 else j in cfg.downsample
        c_out = cfg.width if j == 0 else (2 * c if psi else c)
        factories.append(lambda c_in=c, c_out=c_out, psi=psi: _stage(c_in, c_out, psi, cfg.bn))
        c = c_out
    return factories
