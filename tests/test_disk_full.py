"""A full disk names the file being written (issue 25): the command line's one line said "disk full while
writing the run directory" when the error came from a caching pass's chunk writes, where the OSError names
no file. Run on a real, small tmpfs (skipped where this machine cannot mount one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, synthetic_raw, write_config


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("codec", ["none", "zstd"])  # chunk files written directly, and through zarr
def test_disk_full_while_caching_names_the_file_being_written(tmp_path, small_disk, codec):
    raw = synthetic_raw(small_disk / "run", model={"stages": 2}, cache={"codec": codec}, train={"probes": False})
    out = cli_in_process(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: disk full while writing {small_disk / 'run'}/"), out.stderr
