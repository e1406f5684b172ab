"""Preemption: SIGTERM (and Ctrl-C) stop a stage, the end-to-end network or a caching pass where they are,
with one line and the conventional exit status, and the same command resumes bit-identically from that step.

The signal is real: the process sends it to itself at a named point (CACHETRAIN_FAULT="<point>:<n>:sigterm",
cachetrain/faults.py), at steps drawn from a seeded generator, or the test sends it from outside to the
whole process group, as a terminal's Ctrl-C or a cluster's scheduler does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cachetrain import stop
from cachetrain.cache.manifest import content_digest
from tests.conftest import cli, synthetic_raw, write_config

STEPS = 11  # per epoch: 352 training samples (384, 32 held out for validation) in batches of 32
# steps at which a signal arrives, drawn once from a fixed seed: mid-epoch 1, the last step of epoch 1 (the
# epoch ends, then the loop stops), mid-epoch 2
POINTS = sorted(random.Random(25).sample(range(1, 2 * STEPS), 2)) + [STEPS]


def config(tmp_path: Path, name: str, **sections) -> Path:
    sections = {"train": {"epochs": 2, "probes": False, **sections.pop("train", {})}, **sections}
    return write_config(tmp_path / f"{name}.yaml", synthetic_raw(tmp_path / name, **sections))


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def unit_checkpoint(run: Path, unit: str) -> dict:
    return torch.load(run / unit / "checkpoint.pt", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """Stage 0 and the end-to-end network trained without a stop."""
    tmp = tmp_path_factory.mktemp("reference")
    path = config(tmp, "ref")
    assert cli(["stage", "--config", str(path), "--no-cache"]).returncode == 0
    assert cli(["e2e", "--config", str(path)]).returncode == 0
    return {"stage": unit_checkpoint(tmp / "ref", "stages/stage_0"), "e2e": unit_checkpoint(tmp / "ref", "e2e")}


@pytest.mark.parametrize("command,unit", [pytest.param(["stage", "--no-cache"], "stage", marks=pytest.mark.slow),
                                          (["e2e"], "e2e")])
def test_sigterm_checkpoints_at_the_step_it_came_and_the_rerun_ends_bit_identical(tmp_path, reference, command,
                                                                                  unit):
    points = POINTS if unit == "stage" else POINTS[:1]
    for i, step in enumerate(points):
        path = config(tmp_path, f"run{i}")
        stopped = cli([*command, "--config", str(path)], fault=f"train_step:{step}:sigterm")
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
        line = one_line(stopped.stderr)
        assert line.startswith("stopped by SIGTERM: ") and f"resume with: cachetrain {command[0]} " in line, line
        ck = unit_checkpoint(tmp_path / f"run{i}", "stages/stage_0" if unit == "stage" else "e2e")
        assert ck["step"] == step  # the step the signal came in, not the last periodic checkpoint (none here)
        assert (ck["epoch"], ck["batch"]) == divmod(step, STEPS)
        resumed = cli([*command, "--config", str(path)])
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming at epoch {step // STEPS + 1}, batch {step % STEPS}" in resumed.stdout
        final = unit_checkpoint(tmp_path / f"run{i}", "stages/stage_0" if unit == "stage" else "e2e")
        assert same_weights(final, reference[unit]), f"stopped at step {step}"
        metrics = tmp_path / f"run{i}" / ("stages/stage_0" if unit == "stage" else "e2e") / "metrics.jsonl"
        assert [json.loads(row)["epoch"] for row in metrics.read_text().splitlines()] == [1, 2]  # none twice


@pytest.mark.slow
def test_sigterm_in_a_caching_pass_keeps_whole_chunks_and_the_rerun_finishes_the_same_store(tmp_path):
    ref, run = config(tmp_path, "ref", train={"epochs": 1}), config(tmp_path, "run", train={"epochs": 1})
    for path in (ref, run):
        assert cli(["stage", "--config", str(path), "--no-cache"]).returncode == 0
    assert cli(["cache", "--config", str(ref), "--j", "0"]).returncode == 0
    stopped = cli(["cache", "--config", str(run), "--j", "0"], fault="cache_chunk:3:sigterm")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    line = one_line(stopped.stderr)
    assert line.startswith("stopped by SIGTERM: ") and "chunks written so far are kept" in line, line
    status = cli(["status", "--config", str(run)])
    assert "writing" in status.stdout and "chunks left" in status.stdout  # nothing half-written counts as done
    assert cli(["cache", "--config", str(run), "--j", "0"]).returncode == 0
    for split in ("train", "val", "test"):
        name = f"cache/stage_0/{split}.zarr"
        assert content_digest(tmp_path / "run" / name) == content_digest(tmp_path / "ref" / name) is not None


def children(pid: int) -> list[int]:
    """The processes `pid` started that are alive (Linux: /proc/<pid>/task/<tid>/children)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()]


def test_a_signal_to_the_whole_process_group_is_one_line_and_resumes(tmp_path):
    """A terminal's Ctrl-C, or a scheduler's SIGTERM, reaches every process of the job, the cache loader's
    worker process too (stage 1 reads stage 0's zstd cache through one): one line, exit 130 / 143, no
    traceback from any process; rerunning resumes and ends with the weights of stage 1 trained without a
    stop."""
    sections = {"loader": {"workers": 1}, "cache": {"codec": "zstd"}}
    ref = config(tmp_path, "ref", **sections)
    assert cli(["stage", "--config", str(ref)]).returncode == 0  # stage 0, then its cache
    for name in ("sigint", "sigterm"):
        shutil.copytree(tmp_path / "ref", tmp_path / name)  # the same stage 0 and cache: run_dir is per config
    assert cli(["stage", "--config", str(ref), "--no-cache"]).returncode == 0  # stage 1, not stopped
    want = unit_checkpoint(tmp_path / "ref", "stages/stage_1")
    env = {k: v for k, v in os.environ.items() if k != "CACHETRAIN_FAULT"}
    for signum in (signal.SIGINT, signal.SIGTERM):
        path = config(tmp_path, signum.name.lower(), **sections)
        proc = subprocess.Popen([sys.executable, "-m", "cachetrain.cli", "stage", "--config", str(path), "--no-cache"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        metrics = tmp_path / signum.name.lower() / "stages" / "stage_1" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # into epoch 2: its first epoch is done, the worker kept for the next
        workers = children(proc.pid)
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
        assert workers, "stage 1 read its cache without a worker process: nothing tested the signal reaching one"
        assert proc.returncode == 128 + signum, err
        line = one_line(err)
        assert line.startswith((f"stopped by {signum.name}: ", f"interrupted by {signum.name}: ")), line
        resumed = cli(["stage", "--config", str(path), "--no-cache"])
        assert resumed.returncode == 0, resumed.stderr
        assert same_weights(unit_checkpoint(tmp_path / signum.name.lower(), "stages/stage_1"), want), signum.name


class Ranks:
    """Two ranks' stop requests summed as torchrun's collective would, in one process: `sum` adds the other
    rank's values, which it computes from its own StopRequests."""

    world, rank = 2, 0

    def __init__(self, other):
        self.other = other

    def sum(self, values: list[float]) -> list[float]:
        theirs = [float(self.other.signum == s) for s in stop.SIGNALS]
        return [a + b for a, b in zip(values, theirs)]


def test_ranks_that_got_different_signals_agree_on_a_real_one():
    """SIGTERM on one rank and Ctrl-C on the other: both stop, each with a real signal, and a rank that got
    none takes the other's (a sum of signal numbers once averaged 15 and 2 into 8, SIGFPE, in the message and
    the exit status)."""
    term, intr, none = stop.StopRequests(), stop.StopRequests(), stop.StopRequests()
    term.signum, intr.signum = signal.SIGTERM, signal.SIGINT
    assert term.requested(Ranks(intr)) and term.signum == signal.SIGTERM
    assert intr.requested(Ranks(term)) and intr.signum == signal.SIGINT  # a rank keeps what it got
    assert none.requested(Ranks(intr)) and none.signum == signal.SIGINT
    quiet = stop.StopRequests()
    assert not quiet.requested(Ranks(stop.StopRequests())) and quiet.signum is None
