"""A run written by the code before the run model (cachetrain/run/, issue 24) still reports the same status
and resumes bit-identically: the old package is taken from git history and run in its own process, killed
mid-epoch, then the new code reads and finishes the run.

The old code is commit OLD, the last one before the change; its package is exported with `git archive`
into a scratch folder. A clone without that history cannot run this test (it is skipped, saying so).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import cli, synthetic_raw, write_config

REPO = Path(__file__).resolve().parent.parent
OLD = "8960268"  # main before cachetrain.run: the old RunDir, RunState and checkpoint dicts


def old_package(tmp_path: Path) -> Path:
    have = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD}^{{commit}}"], capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {OLD} is not in this clone's history (a shallow clone); the old code cannot run")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", OLD, "cachetrain"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path / "old", filter="data")
    return tmp_path / "old"


def old_cli(old: Path, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(old)}
    env.pop("CACHETRAIN_FAULT", None)
    if fault:
        env["CACHETRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cachetrain.cli", *args], env=env, cwd=old, capture_output=True,
                          text=True, timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for ck in sorted(run.glob("*/**/checkpoint.pt")):
        for key, tensor in torch.load(ck, weights_only=True)["model"].items():
            out[f"{ck.parent.name}/{key}"] = tensor
    return out


def table(status: str) -> str:
    """What status prints, but its last line (what to run next), compared on its own."""
    return "\n".join(line for line in status.splitlines() if not line.startswith("next:"))


@pytest.mark.slow
def test_a_run_killed_under_the_old_code_reports_the_same_status_and_resumes_bit_identically(tmp_path):
    old = old_package(tmp_path)
    sections = {"train": {"epochs": 2, "checkpoint_steps": 3, "probes": False}}
    killed = write_config(tmp_path / "killed.yaml", synthetic_raw(tmp_path / "killed", **sections))
    whole = write_config(tmp_path / "whole.yaml", synthetic_raw(tmp_path / "whole", **sections))
    # stage 0 (2 epochs of 11 steps) and its cache done, stage 1 killed at step 5 of its first epoch
    assert old_cli(old, ["train", "--config", str(killed)], fault="train_step:27").returncode == -9
    assert old_cli(old, ["e2e", "--config", str(killed)], fault="train_step:5").returncode == -9
    before = old_cli(old, ["status", "--config", str(killed)])
    assert before.returncode == 0, before.stderr
    after = cli(["status", "--config", str(killed)])
    assert after.returncode == 0, after.stderr
    assert table(after.stdout) == table(before.stdout)
    resumes = re.search(r"next: .*", before.stdout).group(0)
    assert resumes == re.search(r"next: .*", after.stdout).group(0) and "resumes stage 1" in resumes
    # the new code finishes it; the same run uninterrupted, by the new code, ends with the same bits
    for args in (["train"], ["e2e"]):
        assert cli([*args, "--config", str(killed)]).returncode == 0
        assert cli([*args, "--config", str(whole)]).returncode == 0
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
