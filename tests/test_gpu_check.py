"""The GPU check script, run on the CPU with --tiny: it must run end to end and write every field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--tiny"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["stage_input"] == "zarr cache via the cache loader"
    assert [s["stage"] for s in r["stages"]] == list(range(8))
    for s in r["stages"]:
        assert s["in_memory_sr"]["samples_per_s"] > 0 and s["in_memory_conv"]["counted_bytes"] > 0
        if s["stage"] > 0:
            assert s["recompute"]["samples_per_s"] > 0
            assert s["cached_none"]["samples_per_s"] > 0 and s["cached_zstd"]["samples_per_s"] > 0
            assert s["loader_only_none"]["samples_per_s"] > 0 and s["loader_only_zstd"]["samples_per_s"] > 0
            if r["have_dali"]:  # DALI's CPU-only pipeline stands in for the GPU one
                assert s["cached_none_dali"]["samples_per_s"] > 0
        if s["stage"] < 7:
            assert s["cache_build_zstd_s"] > 0 and s["cache_bytes_none"] > 0
    summary = r["summary"]
    assert 0 < summary["largest_stage_over_e2e_memory_sr"] < 1.5
    # the naive head keeps full-resolution activations: it is never the cheaper one
    assert summary["largest_stage_over_e2e_memory_conv"] >= summary["largest_stage_over_e2e_memory_sr"] * 0.5
    assert 0 < summary["flop_prediction"]["cached_over_recompute"] < 1
    assert summary["cached_none_over_recompute_45_epochs"] > 0
    assert summary["cache_build_MB_per_s_none"] > 0
    # the per-stage best of cache and recompute is never slower than either everywhere
    assert 0 < summary["best_of_cache_or_recompute_per_stage_over_recompute"] <= 1 + 1e-9
    assert set(summary["cache_wins_at_stages"]) <= set(range(1, 8))
    assert (tmp_path / "out" / "memory.png").exists() and (tmp_path / "out" / "throughput.png").exists()
