"""Smoke runs of the CPU benchmark scripts at toy sizes (slow): writer_bench.py writes and reads back
exactly, and step_bench.py times every arm of both its comparisons on the stage the user asked for. Each
script runs in this process, through its own `main(argv)` (loaded with runpy, as `python SCRIPT` would
run it), so a run costs its work and not a fresh interpreter's imports. The timing helpers the scripts
share are checked here too, without asserting on any time."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from cachetrain.bench.tools import stopwatch, time_each, time_total
from tests.conftest import synthetic_raw, write_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    """Toy-sized steps on a shared 2-core machine: with two threads they mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(script: str, *args: str):
    """`python benchmarks/SCRIPT ARGS`, in this process; what its main returns."""
    return runpy.run_path(str(ROOT / "benchmarks" / script), run_name="benchmark")["main"](list(args))


def test_timers_run_warm_up_calls_untimed_and_time_the_rest():
    calls = []
    seconds = time_total(lambda: calls.append(1), calls=3, warmup=2)
    assert len(calls) == 5 and math.isfinite(seconds) and seconds >= 0
    seen = []
    times = time_each(seen.append, iter("abcdef"), warmup=2)
    assert seen == list("abcdef") and len(times) == 4 and np.all(times >= 0)
    with stopwatch() as watch:
        assert math.isnan(watch.seconds)  # set when the block ends
    assert watch.seconds >= 0


@pytest.mark.slow
def test_writer_bench_tiny_writes_every_row_and_reads_back_exactly(tmp_path, one_thread):
    run_script("writer_bench.py", "--tiny", "--out", str(tmp_path / "out"), "--dir", str(tmp_path))
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(r["rows"]) == {"raw_files", "zarr_no_checksum", "zarr_crc32c", "write_store_from_host"}
    for row in r["rows"].values():
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("seconds", "MB_per_s", "MB_per_cpu_s"))
    assert r["read_back_equal"] == {"write_store_from_host": True}


@pytest.mark.slow
@pytest.mark.parametrize("what, stage, shape, arms, ratios", [
    # the tiny network: 3x16x16 images, width 8, space-to-depth at stage 1 (8x16x16 -> 32x8x8 -> conv to 16)
    ("layout", 1, [8, 16, 16], {"nchw", "channels_last"}, ["nchw_over_channels_last"]),
    ("feed", 2, [16, 8, 8], {"background", "inline", "memory"}, ["background_over_inline", "inline_over_memory"]),
])
def test_step_bench_times_every_arm(tmp_path, capsys, one_thread, what, stage, shape, arms, ratios):
    config = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    run_script("step_bench.py", what, "--config", str(config), "--stage", str(stage), "--batch", "4",
               "--warmup", "1", "--steps", "2", "--rounds", "2", "--out", str(tmp_path / "out"))
    printed = capsys.readouterr().out
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["input_shape"] == shape  # stage j reads stage j-1's output
    assert (r["stage"], r["batch"], r["warmup"], r["steps"], r["rounds"]) == (stage, 4, 1, 2, 2)
    assert set(r["median_step_ms"]) == arms
    assert all(len(v) == 2 and all(math.isfinite(ms) and ms > 0 for ms in v) for v in r["median_step_ms"].values())
    assert all(math.isfinite(r[name]) and r[name] > 0 for name in ratios)
    assert all(f"{name}: " in printed for name in ratios)


@pytest.mark.slow
def test_s3_bench_tiny_runs_every_arm_against_its_own_s3_server(tmp_path, monkeypatch, one_thread):
    """benchmarks/s3_bench.py at a toy size: its own moto server in a process of its own, every arm run
    (each S3 epoch asserts it met every sample), one table row per codec. The AWS_* variables it sets are
    this test's only (monkeypatch restores them), and so is its file system."""
    pytest.importorskip("moto.server", reason="moto[server] is part of [dev]")
    from cachetrain.cache.location import _filesystem

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, "unset")
    try:
        summary = run_script("s3_bench.py", "--samples", "200", "--shape", "4", "8", "8", "--rounds", "1",
                             "--out", str(tmp_path))
    finally:
        _filesystem.cache_clear()
    assert set(summary["results"]) == {"none", "zstd"}
    for res in summary["results"].values():
        row = res["rounds"][0]
        assert row["s3"]["epoch_samples_per_s"] > 0 and row["s3_copies"]["epoch_samples_per_s"] > 0
        assert row["server"]["objects"] >= 1
    table = (tmp_path / "results.md").read_text()
    assert "| none |" in table and "| zstd |" in table
