"""The layerwise study end to end in its quick mode (benchmarks/layerwise_study.py --quick): greedy runs,
the end-to-end baseline, a mitigation and a fork at stage 1, their probes and CKA, and the reports."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_in_process

ROOT = Path(__file__).resolve().parent.parent


def load_study():
    spec = importlib.util.spec_from_file_location("layerwise_study", ROOT / "benchmarks" / "layerwise_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.slow  # every test here reads one quick run of the study's script (a benchmark smoke)

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    summary = load_study().main(["--quick", "--out", str(out)])
    return out, summary


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_study_records_diagnostics_as_it_trains(study):
    out, summary = study
    ref = out / "runs" / "layercnn_k2"
    for j in range(3):
        last = rows(ref / "stages" / f"stage_{j}" / "metrics.jsonl")[-1]
        for key in ("train_acc", "train_eval_acc", "val_acc", "val_loss", "test_acc", "test_loss", "gap"):
            assert last[key] is not None, key
        assert last["gap"] == pytest.approx(last["train_eval_acc"] - last["val_acc"])
    probes = rows(ref / "probes.jsonl")
    assert {(r["net"], r["stage"]) for r in probes if r["pool"] == "gap"} == \
        {(net, j) for net in ("greedy", "e2e") for j in range(3)}
    assert all(0 <= r["test_acc"] <= 1 and r["seconds"] > 0 for r in probes)
    cka = rows(ref / "cka.jsonl")
    assert sorted(r["stage"] for r in cka) == [0, 1, 2] and all(-1e-6 <= r["cka"] <= 1 + 1e-6 for r in cka)


def test_quick_study_writes_reports_and_the_summary_table(study):
    out, summary = study
    assert [r["run"] for r in summary["runs"]] == ["layercnn_k2", "feature_aug"]
    ref = summary["runs"][0]
    assert ref["greedy_test_acc"] is not None and ref["e2e_test_acc"] is not None
    md = (out / "study.md").read_text()
    assert "| layercnn_k2 |" in md and "feature_aug" in md
    for group in ("regime", "all"):
        report = out / f"report_{group}"
        assert (report / "report.md").exists() and (report / "accuracy.png").stat().st_size > 1000


def test_the_fork_in_the_study_reused_stage_0(study):
    out, _ = study
    ref, fork = out / "runs" / "layercnn_k2", out / "runs" / "feature_aug"
    a, b = ref / "stages" / "stage_0" / "checkpoint.pt", fork / "stages" / "stage_0" / "checkpoint.pt"
    assert a.stat().st_ino == b.stat().st_ino
    assert rows(fork / "stages" / "stage_1" / "metrics.jsonl") != rows(ref / "stages" / "stage_1" / "metrics.jsonl")


def test_report_reads_a_run_from_before_the_study(study, tmp_path):
    """A run directory as older versions wrote it (no val, probes, CKA or e2e): missing, not an error."""
    out, _ = study
    old = tmp_path / "old"
    stage = old / "stages" / "stage_0"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text(json.dumps({"stage": 0, "k": 2, "epoch": 1, "train_loss": 0.5,
                                                     "train_acc": 0.8, "test_acc": 0.78}) + "\n")
    r = cli_in_process(["report", "--run", str(old), "--vs", str(out / "runs" / "layercnn_k2"),
                        "--out", str(tmp_path / "rep")])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "report.json").exists()
    r = cli_in_process(["report", "--run", str(tmp_path / "nope")])
    assert r.returncode == 2 and "nope" in r.stderr
