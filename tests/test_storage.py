"""Storage formats: uint8 with per-channel scale, BitRound fp16, and augmented training views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cachetrain.cache import CacheReader
from cachetrain.run import StageState
from cachetrain.cache.quant import calibrate, dequantize, quantize
from tests.conftest import tiny_greedy


def test_uint8_round_trip_error_is_at_most_half_a_step_per_channel():
    g = torch.Generator().manual_seed(0)
    y = torch.relu(torch.randn(64, 5, 7, 7, generator=g) * torch.tensor([0.1, 1, 3, 10, 50]).view(1, 5, 1, 1))
    y[:, 2] -= 1.0  # one channel that is not post-ReLU: an offset is needed
    quant = calibrate([y[:32], y[32:]])
    scale = torch.tensor(quant[0]).view(1, 5, 1, 1)
    err = (dequantize(quantize(y, quant), quant) - y).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    assert quant[1][2] == pytest.approx(-1.0) and quant[1][0] == 0.0
    assert err.amax(dim=(0, 2, 3))[4] > err.amax(dim=(0, 2, 3))[0]  # error follows each channel's own scale


def test_percentile_calibration_clips_only_the_tail():
    y = torch.rand(16, 2, 8, 8)
    y[0, 0, 0, 0] = 1000.0  # one outlier
    scale_max = calibrate([y])[0][0]
    scale_p = calibrate([y], percentile=99.9)[0][0]
    assert scale_max == pytest.approx(1000 / 255) and scale_p < 2 / 255


def train_tiny(tmp_path, **cache):
    g = tiny_greedy(tmp_path / "run", cache=cache, train={"epochs": 2})
    return g, g.train_all()


def test_uint8_cache_trains_and_dequantises_on_the_fly(tmp_path):
    g, rows = train_tiny(tmp_path, dtype="uint8")
    assert rows[-1].test_acc > 0.5
    reader = CacheReader(g.run.layout.store(0, "test"), g.state.output_fingerprint(0))
    assert reader.info.dtype == "uint8" and reader.info.quant is not None
    # stage 0 maps 3x16x16 images to 8x16x16 features: 2048 bytes a sample in uint8, 384 + 128 samples
    assert rows[0].raw_bytes == (384 + 128) * 8 * 16 * 16
    x, _ = next(g.inputs.input_source(1).eval_batches("test", 128))
    with torch.no_grad():
        fresh = g.inputs.trained_stage(0)(next(g.run.data.eval_batches("test", 128))[0])
    scale = torch.tensor(reader.info.quant[0]).view(1, -1, 1, 1)
    in_range = fresh <= 255 * scale  # calibrated on a sample of training batches: the test split may exceed it
    assert torch.all((x - fresh).abs()[in_range] <= (scale / 2 + 1e-5).expand_as(x)[in_range])
    assert (~in_range).float().mean() < 0.01
    stored = zarr.open_array(str(g.run.layout.store(0, "test") / "features"), mode="r")
    assert stored.dtype == np.uint8


def test_bitround_float16_keeps_the_asked_mantissa_bits(tmp_path):
    g, rows = train_tiny(tmp_path, bitround=4)
    x = CacheReader(g.run.layout.store(0, "train"), g.state.output_fingerprint(0)).read_chunk(0)
    mantissa = x.view(torch.int16) & 0x3FF
    assert torch.all(mantissa & 0x3F == 0)  # the 6 lowest of the 10 mantissa bits are zero...
    assert (mantissa != 0).float().mean() > 0.1  # ...while the 4 kept ones still carry values
    assert rows[-1].test_acc > 0.5


def test_augmented_views_are_cached_and_drawn_per_chunk(tmp_path):
    g, rows = train_tiny(tmp_path, views=3)
    assert [r.state for r in rows] == [StageState.TRAINED] * 3
    for j in (0, 1):
        assert [p.name for _, _, p in g.state.stores(j)] == ["train.zarr", "train_v1.zarr", "train_v2.zarr", "val.zarr",
                                                      "test.zarr"]  # val: one plain view, as test
        assert all(p.exists() for _, _, p in g.state.stores(j))
    fp = g.state.output_fingerprint(0)
    views = [CacheReader(g.run.layout.store(0, "train", v), fp).read_chunk(0) for v in range(3)]
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    src = g.inputs.input_source(1)
    assert src.views == 3
    drawn = np.stack([src.view_of(e) for e in range(4)])
    assert set(np.unique(drawn)) == {0, 1, 2}
    # a training batch's features are those of the view drawn for their chunk
    cs = src.readers["train"].info.chunk_samples
    view_of = src.view_of(0)
    x, _ = next(src.train_batches(0, 32))
    idx = np.sort(src.train_indices(0, 32)[:32])
    expected = torch.stack([CacheReader(g.run.layout.store(0, "train", int(view_of[i // cs])), fp)
                            .read_chunk(int(i // cs))[i % cs].float() for i in idx])
    assert torch.equal(x, expected)
