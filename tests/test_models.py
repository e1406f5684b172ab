"""The stage zoo: every architecture splits into J stages whose shapes chain, with heads of any k."""

from __future__ import annotations

import pytest
import torch

from cachetrain.config import ModelConfig
from cachetrain.models import build_network, make_head


@pytest.mark.parametrize("cfg, in_shape, expected_out", [
    (ModelConfig(arch="layercnn", stages=4, width=8, downsample=[1, 3]), (1, 28, 28),
     [(8, 28, 28), (16, 14, 14), (16, 14, 14), (32, 7, 7)]),
    (ModelConfig(arch="layercnn", stages=3, width=4, downsample=[2], input_psi=True), (3, 32, 32),
     [(4, 16, 16), (4, 16, 16), (8, 8, 8)]),
    (ModelConfig(arch="vgg", stages=5, width=8), (1, 28, 28),
     [(8, 28, 28), (16, 14, 14), (32, 7, 7), (64, 3, 3), (64, 1, 1)]),
    (ModelConfig(arch="resnet", stages=5, width=4), (3, 32, 32),
     [(4, 32, 32), (4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]),
    (ModelConfig(arch="resnet", stages=2, width=4), (3, 96, 96), [(4, 24, 24), (4, 24, 24)]),
])
def test_stages_chain_and_match_declared_shapes(cfg, in_shape, expected_out):
    net = build_network(cfg, in_shape, seed=0)
    assert net.out_shapes == expected_out
    x = torch.randn(2, *in_shape)
    for stage, out_shape in zip(net.stages, expected_out):
        x = stage.eval()(x)
        assert tuple(x.shape[1:]) == out_shape


@pytest.mark.parametrize("aux", ["conv", "sr"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_heads_of_depth_k(aux, k):
    cfg = ModelConfig(arch="layercnn", stages=2, width=8, downsample=[1], aux=aux)
    net = build_network(cfg, (1, 28, 28), seed=0)
    head = make_head(cfg, net, 0, k, num_classes=10, seed=0)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == k - 1
    assert head(torch.randn(3, *net.out_shapes[0])).shape == (3, 10)


def test_layercnn_downsampling_is_space_to_depth_then_doubling():
    net = build_network(ModelConfig(arch="layercnn", stages=2, width=8, downsample=[1]), (1, 28, 28), seed=0)
    first = net.stages[1][0]
    assert isinstance(first, torch.nn.PixelUnshuffle) and net.stages[1][1].in_channels == 32


def test_stage_init_depends_on_seed_and_j_only():
    a = build_network(ModelConfig(stages=3, width=8, downsample=[1]), (1, 28, 28), seed=5)
    b = build_network(ModelConfig(stages=2, width=8, downsample=[1], k=3), (1, 28, 28), seed=5)
    c = build_network(ModelConfig(stages=3, width=8, downsample=[1]), (1, 28, 28), seed=6)
    w = lambda net, j: next(net.stages[j].parameters())  # noqa: E731
    assert torch.equal(w(a, 1), w(b, 1))
    assert not torch.equal(w(a, 1), w(c, 1))
    assert not torch.equal(w(a, 0)[:1].flatten()[:8], w(a, 1)[:1].flatten()[:8])


def test_sr_head_reduces_space_before_its_convs():
    cfg = ModelConfig(arch="layercnn", stages=1, width=8, aux="sr")
    net = build_network(cfg, (3, 64, 64), seed=0)
    head = make_head(cfg, net, 0, 3, num_classes=5, seed=0)
    assert isinstance(head[0], torch.nn.AdaptiveAvgPool2d) and head[0].output_size == 16
