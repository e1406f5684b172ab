"""The benchmark: every field present, the three regimes on the same architecture, memory accounting
checked against a case computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cachetrain.cli import main
from cachetrain.profile import forward_flops, step_memory
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


def test_bench_quick_writes_every_field_and_plots(tmp_path):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(path), "--quick", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["cached"]["architecture"] == r["recompute"]["architecture"]
    assert [s["stage"] for s in r["cached"]["stages"]] == [0, 1, 2]
    for s in r["cached"]["stages"][:2]:
        assert s["cache_seconds"] > 0 and s["bare_forward_seconds"] > 0 and s["cache_bytes"] > 0
    for regime in ("cached", "recompute"):
        for s in r[regime]["stages"]:
            assert s["steady_samples_per_s"] > 0 and s["seconds_per_epoch"] > 0 and 0 <= s["test_acc"] <= 1
            assert 0 < s["wait_seconds"] < s["train_seconds"] and s["step_seconds"] > 0
    q = r["ratios"]
    assert q["cached_over_recompute_time"] == pytest.approx(r["cached"]["total_seconds"] /
                                                            r["recompute"]["total_seconds"])
    assert q["greedy_minus_e2e_accuracy"] == pytest.approx(r["cached"]["test_acc"] - r["e2e"]["test_acc"])
    assert q["cache_build_over_bare_forward"] == pytest.approx(
        sum(s["cache_seconds"] for s in r["cached"]["stages"][:2]) /
        sum(s["bare_forward_seconds"] for s in r["cached"]["stages"][:2]))
    assert q["cached_over_recompute_step_time"] == pytest.approx(
        sum(s["step_seconds"] for s in r["cached"]["stages"]) / sum(s["step_seconds"] for s in r["recompute"]["stages"]))
    assert set(r["ratios"]) == {"cached_over_recompute_time", "flop_predicted_cached_over_recompute",
                                "cached_over_recompute_step_time",
                                "largest_stage_over_e2e_memory", "cache_build_over_bare_forward",
                                "greedy_minus_e2e_accuracy"}
    assert 0 < r["ratios"]["flop_predicted_cached_over_recompute"] < 1
    stage_mem = [s["memory"]["total_bytes"] for s in r["costs"]["stages"]]
    assert max(stage_mem) < r["costs"]["e2e"]["memory"]["total_bytes"]
    for png in ("accuracy.png", "memory.png", "throughput.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "greedy-cached / greedy-recompute total time" in md and "| recompute: wait s |" in md
