"""The writer and layout benchmarks run on the CPU at toy sizes and report every row they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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


def test_layout_bench_times_both_layouts(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "layout_bench.py"), "--stage", "1", "--batch",
                           "8", "--steps", "2", "--rounds", "2", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["input_shape"] == [32, 28, 28]  # stage 1 of the Fashion-MNIST bench network reads stage 0's output
    assert all(len(v) == 2 and min(v) > 0 for v in r["median_step_ms"].values())
    assert r["nchw_over_channels_last"] > 0


def test_feed_bench_times_both_feeds(tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "feed_bench.py"), "--stage", "2", "--batch", "8",
                           "--steps", "2", "--rounds", "2", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["input_shape"] == [64, 14, 14]  # stage 2 of the Fashion-MNIST bench network reads stage 1's output
    assert all(len(v) == 2 and min(v) > 0 for v in r["median_step_ms"].values())
    assert r["loader_over_memory"] > 0
