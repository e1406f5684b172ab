"""The stage/model zoo: every architecture is a list of J stages, each trainable with its own head.

A network is built stage by stage, each under its own seed (derived from the run seed and j), so
stage j's initial weights do not depend on how the other stages or heads are configured.

Two options lower what a training step holds without changing a value or a parameter
(cachetrain.models.chain): `checkpoint_activations` recomputes each BN -> ReLU pair in the backward
instead of keeping its output (train.checkpoint_activations), and `inplace_relu` (on by default)
lets ReLU overwrite its input. Both are keywords of build_network and make_head, so the same weights
come out either way. Build under `with torch.device("meta"):` to get shapes and a memory count
without allocating anything (cachetrain.plan.memory does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cachetrain.config import ModelConfig
from cachetrain.models import layercnn, resnet, vgg
from cachetrain.models.chain import configure
from cachetrain.models.heads import build_head

Shape = tuple[int, int, int]  # (C, H, W) of one sample


def _factories(cfg: ModelConfig, in_shape: Shape):
    c, h, _ = in_shape
    if cfg.arch == "layercnn":
        return layercnn.stage_factories(cfg, c)
    if cfg.arch == "vgg":
        return vgg.stage_factories(cfg, c, h)
    if cfg.arch == "resnet":
        return resnet.stage_factories(cfg, c, h)
    raise ValueError(f"unknown architecture {cfg.arch!r}; expected layercnn, vgg or resnet")


def stage_seed(seed: int, j: int) -> int:
    return seed * 1009 + j


@dataclass
class Network:
    """J stages and the (C, H, W) shape each one consumes and produces."""

    stages: nn.ModuleList
    in_shapes: list[Shape]
    out_shapes: list[Shape]

    @property
    def depth(self) -> int:
        return len(self.stages)


def build_network(cfg: ModelConfig, in_shape: Shape, seed: int, *, checkpoint_activations: bool = False,
                  inplace_relu: bool = True) -> Network:
    stages, in_shapes, out_shapes = nn.ModuleList(), [], []
    shape = tuple(in_shape)
    for j, make in enumerate(_factories(cfg, in_shape)):
        torch.manual_seed(stage_seed(seed, j))
        stage = configure(make(), checkpoint_activations, inplace_relu)
        with torch.no_grad():
            # shape inference on one sample; eval mode so BN accepts a batch of one
            out = stage.eval()(torch.zeros(1, *shape))
        stage.train()
        in_shapes.append(shape)
        shape = tuple(out.shape[1:])
        out_shapes.append(shape)
        stages.append(stage)
    return Network(stages, in_shapes, out_shapes)


def make_head(cfg: ModelConfig, net: Network, j: int, k: int, num_classes: int, seed: int, *,
              checkpoint_activations: bool = False, inplace_relu: bool = True) -> nn.Sequential:
    torch.manual_seed(stage_seed(seed, j) + 500_000)  # independent of the stage's own draws
    head = build_head(cfg.aux, net.out_shapes[j], k, cfg.aux_width, num_classes, bn=cfg.bn)
    return configure(head, checkpoint_activations, inplace_relu)


__all__ = ["Network", "Shape", "build_network", "configure", "make_head", "build_head", "stage_seed"]
