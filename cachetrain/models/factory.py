"""The models a run trains, built from its config: what `train/`, `plan/` and `bench/` all build.

- `StageModel`: greedy stage j's block followed by its auxiliary head of depth k (what a stage trains);
- `stage_model`: that pair for stage j of a built `Network`, the head seeded for (seed, j);
- `e2e_network`: every stage, then the last stage's head, as one nn.Sequential: the end-to-end network.
  Its stages and head start from the same seeded weights as the greedy ones.
"""

from __future__ import annotations

import torch
from torch import nn

from cachetrain.config import Config
from cachetrain.models import Network, Shape, build_network, make_head


class StageModel(nn.Module):
    def __init__(self, stage: nn.Module, head: nn.Module):
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x))


def network(cfg: Config, sample_shape: Shape, **options) -> Network:
    """The run's network of J stages at their seeded initial weights (`options`: build_network's keywords;
    train.checkpoint_activations by default)."""
    options.setdefault("checkpoint_activations", cfg.train.checkpoint_activations)
    return build_network(cfg.model, sample_shape, cfg.train.seed, **options)


def stage_model(cfg: Config, net: Network, j: int, k: int, num_classes: int, seed: int | None = None,
                **options) -> StageModel:
    """Stage j of `net` with a fresh auxiliary head of depth k (seeded from `seed`, default train.seed)."""
    options.setdefault("checkpoint_activations", cfg.train.checkpoint_activations)
    seed = cfg.train.seed if seed is None else seed
    return StageModel(net.stages[j], make_head(cfg.model, net, j, k, num_classes, seed, **options))


def e2e_network(cfg: Config, sample_shape: Shape, num_classes: int, **options) -> nn.Sequential:
    """Stages 0..J-1 and the last stage's head (depth model.k), as one network."""
    net = network(cfg, sample_shape, **options)
    head = stage_model(cfg, net, net.depth - 1, cfg.model.k, num_classes, **options).head
    return nn.Sequential(*net.stages, head)
