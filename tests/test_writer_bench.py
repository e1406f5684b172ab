"""The writer and layout benchmarks run on the CPU at toy sizes and report every row they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_writer_bench_tiny_runs_on_cpu(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "writer_bench.py"), "--tiny", "--out",
                           str(tmp_path / "out"), "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(r["rows"]) == {"raw_files", "zarr_no_checksum", "zarr_crc32c", "write_store_from_host"}
    assert all(row["MB_per_s"] > 0 and row["MB_per_cpu_s"] > 0 for row in r["rows"].values())
    assert r["MB"] == 64 * 8 * 16 * 16 * 2 / 1e6
    assert r["read_back_equal"] == {"write_store_from_host": True}


@pytest.mark.parametrize("script, stage, shape, arms, ratios", [
    ("layout_bench.py", 1, [32, 28, 28], {"nchw", "channels_last"}, ["nchw_over_channels_last"]),
    ("feed_bench.py", 2, [64, 14, 14], {"background", "inline", "memory"},
     ["background_over_inline", "inline_over_memory"]),
])
def test_step_benches_time_every_arm(tmp_path, script, stage, shape, arms, ratios):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--stage", str(stage), "--batch", "8",
                           "--steps", "2", "--rounds", "3", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["input_shape"] == shape  # stage j of the Fashion-MNIST bench network reads stage j-1's output
    assert set(r["median_step_ms"]) == arms
    assert all(len(v) == 3 and min(v) > 0 for v in r["median_step_ms"].values())
    assert all(r[name] > 0 for name in ratios)
