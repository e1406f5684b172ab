"""The benchmark's arithmetic and accounting, each checked against values worked out by hand: the memory
and FLOPs of one training step, the FLOP prediction of the cached / recompute time ratio, and the
ratios gpu_bench.py reports. One smoke run of `cachetrain bench --quick` (slow) checks its fields
against the tiny network's shapes and FLOPs, computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from cachetrain.bench.compare import predicted_time_ratio
from cachetrain.bench.tools import gpu_summary
from cachetrain.cli import main
from cachetrain.plan.planner import Workload
from cachetrain.plan.profile import forward_flops, step_memory, train_step_flops
from tests.conftest import synthetic_raw, write_config


def test_step_memory_matches_a_hand_computed_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 8 * 16 * 16, (2,))
    mem = step_memory(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    conv_input = 2 * 3 * 16 * 16 * 4  # saved by the conv for its weight gradient
    relu_output = 2 * 8 * 16 * 16 * 4  # saved by ReLU for its backward
    log_softmax = 2 * 8 * 16 * 16 * 4  # saved by cross-entropy
    nll = 2 * 8 + 4  # the int64 targets and the total weight
    assert mem.saved_bytes == conv_input + relu_output + log_softmax + nll
    params = (8 * 3 * 9 + 8) * 4
    assert (mem.param_bytes, mem.grad_bytes, mem.optimizer_bytes) == (params, params, params)  # momentum buffers
    assert forward_flops(model, x) == 2 * 2 * 8 * 16 * 16 * 3 * 9


def test_train_step_flops_match_a_hand_computed_conv_and_leave_the_weights_alone():
    """Forward: one multiply-add (2 FLOPs) per output value and kernel tap. Backward: the weight gradient
    costs as much again; the input needs no gradient, so nothing more."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten())
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 8 * 16 * 16, (2,))
    forward = 2 * 2 * 8 * 16 * 16 * 3 * 9
    assert train_step_flops(model, x, y) == 2 * forward
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# a three-stage cost table in the shape `memory_and_flops` writes (per sample): block forward, block + head
# forward (each epoch's test evaluation), block + head training step
COSTS = {"stages": [
    {"stage": 0, "block_flops_per_sample": 1.0, "eval_flops_per_sample": 1.5, "train_flops_per_sample": 3.0},
    {"stage": 1, "block_flops_per_sample": 2.0, "eval_flops_per_sample": 3.0, "train_flops_per_sample": 6.0},
    {"stage": 2, "block_flops_per_sample": 4.0, "eval_flops_per_sample": 6.0, "train_flops_per_sample": 12.0},
]}
SHAPES = [(1, 2, 2)] * 3


def test_flop_prediction_of_the_time_ratio_by_hand():
    """10 training and 2 test samples, 3 epochs, stages 0 and 1 cached.
    Both regimes: training 3 * 10 * (3 + 6 + 12) = 630 and test evaluations 3 * 2 * (1.5 + 3 + 6) = 63.
    Cached: one caching pass over the 12 samples per cached stage, 12 * (1 + 2) = 36.
    Recompute: every epoch, all 12 samples forwarded through the frozen stages before each stage:
    3 * 12 * (0 + 1 + (1 + 2)) = 144."""
    got = predicted_time_ratio(COSTS, SHAPES, Workload(train=10, test=2, epochs=3), {0, 1})
    assert got == pytest.approx((630 + 63 + 36) / (630 + 63 + 144))
    # caching only stage 1: stage 1 still recomputes stage 0 every epoch (3 * 12 * 1 = 36); the caching
    # pass forwards through stages 0 and 1 (12 * 3 = 36); stage 2 reads cache 1
    got = predicted_time_ratio(COSTS, SHAPES, Workload(train=10, test=2, epochs=3), {1})
    assert got == pytest.approx((630 + 63 + 36 + 36) / (630 + 63 + 144))
    # two views: the caching passes go over the training set twice, 22 samples
    got = predicted_time_ratio(COSTS, SHAPES, Workload(train=10, test=2, epochs=3, views=2), {0, 1})
    assert got == pytest.approx((630 + 63 + 22 * 3) / (630 + 63 + 144))


def _gpu_rows() -> dict:
    """A gpu_bench.py result of 3 stages on 10 samples, rates in samples/s, chosen so the sums are round."""
    def rate(v, counted=None):
        return {"samples_per_s": v} if counted is None else {"samples_per_s": v, "counted_bytes": counted}
    stages = [
        {"stage": 0, "in_memory_sr": rate(100, 40), "in_memory_conv": rate(90, 80),
         "bare_forward_s": 1.0, "cache_build_none_s": 2.0, "cache_bytes_none": 1_000_000},
        {"stage": 1, "in_memory_sr": rate(200, 60), "in_memory_conv": rate(90, 50),
         "recompute": rate(50), "cached_none": rate(100), "loader_only_none": rate(1000),
         "bare_forward_s": 1.5, "cache_build_none_s": 3.0, "cache_bytes_none": 3_000_000},
        {"stage": 2, "in_memory_sr": rate(400, 20), "in_memory_conv": rate(90, 30),
         "recompute": rate(40), "cached_none": rate(20), "loader_only_none": rate(1000)},
    ]
    return {"stages": stages, "e2e": {"sr": {"counted_bytes": 120}, "conv": {"counted_bytes": 100}},
            "have_zarr": True, "samples": 10, "codecs": ["none"], "sources": ["none"]}


def test_gpu_summary_by_hand():
    s = gpu_summary(_gpu_rows(), epochs=45, memory_key="counted_bytes")
    # seconds per sample of one epoch of all stages; stage 0 always trains on images (1/100 s)
    in_memory, recompute, cached = 1 / 100 + 1 / 200 + 1 / 400, 1 / 100 + 1 / 50 + 1 / 40, 1 / 100 + 1 / 100 + 1 / 20
    assert s["seconds_per_sample_one_epoch_each_stage"] == pytest.approx(
        {"in_memory": in_memory, "recompute": recompute, "cached_none": cached})
    assert s["in_memory_over_recompute_per_epoch"] == pytest.approx(0.0175 / 0.055)
    # the cache wins at stage 1 (100 > 50 samples/s), recompute at stage 2 (40 > 20)
    assert s["cache_wins_at_stages"] == [1]
    assert s["best_of_cache_or_recompute_per_stage_over_recompute"] == pytest.approx((0.01 + 0.01 + 0.025) / 0.055)
    # 45 epochs of the cached run plus its caching passes (2 + 3 s over 10 samples: 0.5 s per sample)
    assert s["cached_none_over_recompute_45_epochs"] == pytest.approx((45 * 0.07 + 0.5) / (45 * 0.055))
    assert s["cached_none_over_in_memory_per_epoch"] == pytest.approx(0.07 / 0.0175)
    assert s["cache_build_over_bare_forward_none"] == pytest.approx(5 / 2.5)
    assert s["cache_build_MB_per_s_none"] == pytest.approx(4 / 5)  # 4 MB in 5 s
    assert s["largest_stage_over_e2e_memory_sr"] == pytest.approx(60 / 120)
    assert s["largest_stage_over_e2e_memory_conv"] == pytest.approx(80 / 100)


@pytest.mark.slow
def test_bench_quick_writes_every_field_and_plots(tmp_path):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(path), "--quick", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    # the tiny network (3x16x16 images, width 8, space-to-depth at stage 1): stage j's output shape
    shapes = [[8, 16, 16], [16, 8, 8], [16, 8, 8]]
    assert [a["out_shape"] for a in r["cached"]["architecture"]] == shapes
    assert r["cached"]["architecture"] == r["recompute"]["architecture"]
    # block forward FLOPs per sample, 2 per multiply-add: 3->8 channels at 16x16; 32->16 at 8x8; 16->16 at 8x8
    block = [2 * 8 * 16 * 16 * 3 * 9, 2 * 16 * 8 * 8 * 32 * 9, 2 * 16 * 8 * 8 * 16 * 9]
    assert [s["block_flops_per_sample"] for s in r["costs"]["stages"]] == block
    assert [s["stage"] for s in r["cached"]["stages"]] == [0, 1, 2]
    # stages 0 and 1 are cached: 384 + 128 samples of their outputs, 2 bytes each value before compression
    for s, shape in zip(r["cached"]["stages"][:2], shapes):
        assert s["raw_bytes"] == 512 * math.prod(shape) * 2
        assert 0 < s["cache_bytes"]
        assert s["cache_seconds"] > 0 and s["bare_forward_seconds"] > 0
    assert "cache_seconds" not in r["cached"]["stages"][2]  # nothing reads the last stage's outputs
    assert all("cache_seconds" not in s for s in r["recompute"]["stages"])
    for regime in ("cached", "recompute"):
        for s in r[regime]["stages"]:
            assert s["epochs"] == 1 and 0 <= s["test_acc"] <= 1
            assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("steady_samples_per_s", "seconds_per_epoch",
                                                                 "step_seconds", "train_seconds"))
    assert set(r["ratios"]) == {"cached_over_recompute_time", "flop_predicted_cached_over_recompute",
                                "cached_over_recompute_step_time",
                                "largest_stage_over_e2e_memory", "cache_build_over_bare_forward",
                                "greedy_minus_e2e_accuracy"}
    assert all(math.isfinite(v) for v in r["ratios"].values())
    # recomputing stage 0 for stage 1, and stages 0-1 for stage 2, costs more than caching them once
    assert 0 < r["ratios"]["flop_predicted_cached_over_recompute"] < 1
    stage_mem = [s["memory"]["total_bytes"] for s in r["costs"]["stages"]]
    assert max(stage_mem) < r["costs"]["e2e"]["memory"]["total_bytes"]
    for png in ("accuracy.png", "memory.png", "throughput.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "greedy-cached / greedy-recompute total time" in md and "| recompute: wait s |" in md
