"""The GPU check script, run on the CPU as a user would start it (`gpu_check.sh OUT --tiny`), shrunk to the
first two stages of the layout: every arm of stage 1 (input in memory, recomputed, read back from an
uncompressed and a zstd cache, each loader alone) and stage 0's caching pass produce finite positive
figures, and results.json holds every field the README's H200 section quotes. DALI's arm is left out
here (its CPU-only pipeline is tested in test_dali.py). The summary's arithmetic is checked against a
hand-computed table in test_bench.py."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--tiny", "--stages", "2",
                           "--no-dali"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu_check: torch" in (out / "log.txt").read_text()
    r = json.loads((out / "results.json").read_text())
    assert r["stage_input"] == "zarr cache via the cache loader"
    assert r["sources"] == ["none", "zstd"] and r["codecs"] == ["none", "zstd"]
    # the ImageNet layout at 32 px: stage 0 takes the images (space-to-depth inside it), stage 1 its width-8 output
    assert [s["in_shape"] for s in r["stages"]] == [[3, 32, 32], [8, 16, 16]]
    for aux in ("sr", "conv"):
        assert positive(r["e2e"][aux]["samples_per_s"]) and positive(r["e2e"][aux]["counted_bytes"])
    stage0, stage1 = r["stages"]
    for aux in ("sr", "conv"):
        assert all(positive(s[f"in_memory_{aux}"][k]) for s in r["stages"] for k in ("samples_per_s", "counted_bytes"))
    for arm in ("recompute", "cached_none", "cached_zstd", "loader_only_none", "loader_only_zstd"):
        assert positive(stage1[arm]["samples_per_s"]), arm
    assert "recompute" not in stage0  # stage 0 trains on the images in every plan
    for key in ("bare_forward_s", "cache_build_none_s", "cache_build_zstd_s", "cache_bytes_none", "cache_bytes_zstd"):
        assert positive(stage0[key]), key
    assert "cache_build_none_s" not in stage1  # nothing reads the last stage's outputs
    # uncompressed: at least the fp16 outputs of the 16 samples (8x16x16 each), plus metadata
    assert stage0["cache_bytes_none"] >= 16 * 8 * 16 * 16 * 2
    s = r["summary"]
    for key in ("largest_stage_over_e2e_memory_sr", "largest_stage_over_e2e_memory_conv",
                "cache_build_over_bare_forward_none", "cache_build_MB_per_s_none",
                "cached_none_over_recompute_45_epochs", "cached_none_over_in_memory_per_epoch",
                "cached_zstd_over_recompute_45_epochs", "best_of_cache_or_recompute_per_stage_over_recompute",
                "in_memory_over_recompute_per_epoch"):
        assert positive(s[key]), key
    assert set(s["cache_wins_at_stages"]) <= {1}
    assert set(s["seconds_per_sample_one_epoch_each_stage"]) == {"in_memory", "recompute", "cached_none", "cached_zstd"}
    flops = s["flop_prediction"]
    assert flops["epochs"] == 45 and len(flops["train_gflop_per_sample"]) == len(flops["forward_gflop_per_sample"]) == 2
    # 45 epochs of recomputing stage 0 for stage 1 against one caching pass of it
    assert 0 < flops["cached_over_recompute"] < 1
    assert (out / "memory.png").stat().st_size > 1000 and (out / "throughput.png").stat().st_size > 1000
