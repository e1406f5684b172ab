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
    assert all(s["samples_per_s"] > 0 and s["counted_bytes"] > 0 for s in r["stages"])
    assert 0 < r["largest_stage_over_e2e_memory"] < 1.5
    assert (tmp_path / "out" / "memory.png").exists() and (tmp_path / "out" / "throughput.png").exists()
