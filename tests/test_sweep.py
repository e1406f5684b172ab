"""`cachetrain sweep`: a grid x seeds from one base config, runs sharing the stages they have in common, resumable;
the report's seed aggregation checked against numbers worked out by hand.

The sweep test trains a tiny synthetic grid (3 stages, 2 seeds, train.feature_flip off/on: the flip run shares
stage 0 with its seed's base run and forks at stage 1). Killed mid-way (SIGKILL inside a training step) and
rerun, it must finish every run, continue the killed stage from its checkpoint, and have trained each shared
stage once: the shared stage-0 checkpoints are one file (one inode) per seed, and the count of distinct
stage checkpoint files is the plan's count of stage trainings with sharing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli, cli_in_process, synthetic_raw, write_config


def _base(tmp_path: Path, **train) -> Path:
    raw = synthetic_raw(tmp_path / "unused")
    raw["data"].update(synthetic_train=192, synthetic_test=64)
    # probes off (they are tested elsewhere); a mid-epoch checkpoint every 2 steps, so a kill mid-epoch resumes there
    raw["train"].update(epochs=1, probes=False, checkpoint_steps=2, **train)
    return write_config(tmp_path / "base.yaml", raw)


def _checkpoints(out: Path) -> dict[str, int]:
    """{run/stage: inode} of every stage checkpoint of the sweep."""
    return {f"{p.parent.parent.parent.name}/{p.parent.name}": os.stat(p).st_ino
            for p in sorted((out / "runs").glob("*/stages/stage_*/checkpoint.pt"))}


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_trains_each_shared_stage_once(tmp_path):
    base, out = _base(tmp_path), tmp_path / "sweep"
    args = ["sweep", "--config", str(base), "--grid", "train.feature_flip=false,true", "--seeds", "2",
            "--out", str(out)]
    # 176 training samples in batches of 32: 6 steps per stage; the 10th step is stage 1 of the first run
    killed = cli(args, fault="train_step:10")
    assert killed.returncode == -9, killed.stderr
    assert "with prefix sharing: 10 stage trainings, 6 caching passes; without: 12 stage trainings, 8 caching " \
           "passes" in killed.stdout
    assert not (out / "report").exists()
    first = out / "runs" / "feature_flip=false,seed=0" / "stages" / "stage_0" / "checkpoint.pt"
    trained_before_the_kill = os.stat(first).st_ino

    done = cli(args)
    assert done.returncode == 0, done.stderr
    assert "stage 1: resuming at epoch 1, batch 2/6" in done.stdout  # the killed stage continued from its checkpoint
    assert os.stat(first).st_ino == trained_before_the_kill  # and the one before it was not trained again
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    names = [r["name"] for r in runs]
    assert names == ["feature_flip=false,seed=0", "feature_flip=true,seed=0", "feature_flip=false,seed=1",
                     "feature_flip=true,seed=1"]
    assert [(r["parent"], r["at"]) for r in runs] == [(None, 0), (names[0], 1), (None, 0), (names[2], 1)]
    ino = _checkpoints(out)
    assert len(ino) == 12  # every run has its 3 stages...
    assert len(set(ino.values())) == 10  # ...from 10 trainings: each seed's stage 0 is one file in both runs
    for seed in (0, 1):
        assert ino[f"feature_flip=false,seed={seed}/stage_0"] == ino[f"feature_flip=true,seed={seed}/stage_0"]
        assert ino[f"feature_flip=false,seed={seed}/stage_1"] != ino[f"feature_flip=true,seed={seed}/stage_1"]
    # the two seeds are independent draws: other initial weights, other validation split
    configs = [yaml.safe_load((out / "runs" / n / "config.yaml").read_text()) for n in names[::2]]
    assert [(c["train"]["seed"], c["data"]["split_seed"]) for c in configs] == [(0, 0), (1, 1)]
    assert ino[f"{names[0]}/stage_0"] != ino[f"{names[2]}/stage_0"]

    report = json.loads((out / "report" / "report.json").read_text())
    assert [(g["label"], len(g["runs"])) for g in report["groups"]] == [("feature_flip=false", 2),
                                                                        ("feature_flip=true", 2)]
    # head averaging of one head is the assembled network itself: eval's accuracy on the raw test images
    heads = [json.loads(line) for line in (out / "runs" / names[1] / "heads.jsonl").read_text().splitlines()]
    assert [h["heads"] for h in heads] == [1, 2, 3]
    ev = cli_in_process(["eval", "--run", str(out / "runs" / names[1])])
    assert ev.returncode == 0, ev.stderr
    assert f"{100 * heads[0]['test_acc']:.2f}%" in ev.stdout.split("raw test images")[1].splitlines()[0]

    again = cli(args)  # a finished sweep: every run skipped
    assert again.returncode == 0 and all(f"{n}: done" in again.stdout for n in names)
    other = cli_in_process([*args[:-4], "--seeds", "3", "--out", str(out), "--plan"])
    assert other.returncode == 2 and "holds another sweep" in other.stderr and len(other.stderr.splitlines()) == 1


def test_the_plan_forks_each_run_at_the_first_stage_its_settings_change(tmp_path):
    """stages.2.lr changes stage 2 on (fork at 2), train.e2e_epochs no stage (fork at J=3), model.k stage 0 (no
    sharing); every seed is its own tree."""
    from cachetrain.sweep.plan import plan, totals
    from cachetrain.sweep.spec import make_spec

    spec = make_spec(str(_base(tmp_path)), [], [], str(write_config(tmp_path / "grids.yaml", [
        {}, {"stages.2.lr": 0.01}, {"train.e2e_epochs": 3, "e2e": True}, {"model.k": [1]}])), seeds=2, e2e=False)
    nodes = plan(spec.runs(tmp_path / "out"))
    got = [(n.run.name, n.parent, n.at, n.stage_trainings, n.caching_passes) for n in nodes]
    # grid by grid, each grid's seeds in turn
    assert got[::2] == [("base,seed=0", None, 0, 3, 2), ("lr=0.01,seed=0", "base,seed=0", 2, 1, 0),
                        ("e2e_epochs=3,seed=0", "base,seed=0", 3, 0, 0), ("k=1,seed=0", None, 0, 3, 2)]
    assert [n.parent for n in nodes[1::2]] == [None, "base,seed=1", "base,seed=1", None]
    assert [n.run.e2e for n in nodes[::2]] == [False, False, True, False]
    assert totals(nodes, True) == (2 * 7, 2 * 4, 2) and totals(nodes, False) == (2 * 12, 2 * 8, 2)


def test_cache_settings_share_stage_0_and_count_its_cache_again(tmp_path):
    from cachetrain.sweep.plan import plan
    from cachetrain.sweep.spec import make_spec

    spec = make_spec(str(_base(tmp_path)), [], ["cache.views=1,2"], None, 1, False)
    a, b = plan(spec.runs(tmp_path / "out"))
    assert (b.parent, b.at, b.stage_trainings, b.caching_passes) == (a.run.name, 1, 2, 2)


@pytest.mark.parametrize("grid, says", [
    ("train.seed=1,2", "what --seeds sets"),
    ("loader.workers=0,1", "changes no result"),
    ("train.nope=1,2", "'train.nope' is not a config key"),
    ("model.k=2,2", "the value 2 is given twice"),
    ("model.k", "expected key=value1,value2"),
    ("model.k=9", "model.k: expected an integer in [1, 8]"),
])
def test_a_bad_grid_is_one_line_before_anything_runs(tmp_path, grid, says):
    out = tmp_path / "out"
    r = cli_in_process(["sweep", "--config", str(_base(tmp_path)), "--grid", grid, "--out", str(out)])
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not out.exists()


def test_runs_are_named_by_their_settings(tmp_path):
    from cachetrain.sweep.spec import make_spec

    spec = make_spec(str(_base(tmp_path)), [], ["model.downsample=[1],[1, 2]", "stages.1.lr=0.1"], None, 1, False)
    assert [r.name for r in spec.runs(tmp_path)] == ["downsample=1,lr=0.1,seed=0", "downsample=1-2,lr=0.1,seed=0"]
    assert spec.runs(tmp_path)[1].cfg.model.downsample == [1, 2]


# -- the report's seed aggregation, on hand-written runs ---------------------------------------------------------
def _run(root: Path, name: str, seed: int, k: int, rows: list[tuple], e2e: float | None = None) -> Path:
    """A run folder as a finished run leaves it: config.yaml and one metrics row per stage
    (val_acc, train_eval_acc, test_acc), optionally an end-to-end row."""
    run = root / name
    (run / "stages").mkdir(parents=True)
    cfg = {"name": name, "model": {"stages": len(rows), "k": k}, "train": {"seed": seed}, "data": {"split_seed": seed}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for j, (val, train_eval, test) in enumerate(rows):
        (run / "stages" / f"stage_{j}").mkdir()
        row = {"epoch": 1, "val_acc": val, "train_eval_acc": train_eval, "test_acc": test, "train_acc": train_eval}
        (run / "stages" / f"stage_{j}" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    if e2e is not None:
        (run / "e2e").mkdir()
        (run / "e2e" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": e2e}) + "\n")
    return run


def test_the_report_aggregates_seeds_with_hand_computed_intervals(tmp_path):
    from cachetrain.study.report import write_report

    # reference (k=2): last-stage test acc 0.80, 0.82, 0.84 (seeds 0, 1, 2); e2e 0.83, 0.85, 0.84
    # k=3: 0.85, 0.89, 0.87; k=1: 0.83, 0.81, 0.85
    ref = [_run(tmp_path, f"ref{s}", s, 2, [(0.80, 0.85, 0.70), (v, 0.90, t)], e2e=e)
           for s, v, t, e in ((0, 0.801, 0.80, 0.83), (1, 0.82, 0.82, 0.85), (2, 0.82, 0.84, 0.84))]
    same = (0.80, 0.85, 0.70)
    k3 = [_run(tmp_path, f"k3_{s}", s, 3, [same, (0.82, 0.9, t)]) for s, t in ((0, .85), (1, .89), (2, .87))]
    k1 = [_run(tmp_path, f"k1_{s}", s, 1, [same, (0.82, 0.9, t)]) for s, t in ((0, .83), (1, .81), (2, .85))]
    report = write_report([*ref, *k3, *k1], tmp_path / "report")
    g = {x["label"]: x for x in report["groups"]}
    assert list(g) == ["reference", "model.k=3", "model.k=1"]

    # mean 0.82, s = 0.02, 95% t-interval: t(0.975, 2) = 4.3027 (tables) * 0.02 / sqrt(3) = 0.049683
    greedy = g["reference"]["summaries"]["greedy"]
    assert greedy["n"] == 3 and greedy["mean"] == pytest.approx(0.82) and greedy["sd"] == pytest.approx(0.02)
    assert greedy["half"] == pytest.approx(0.049683, abs=2e-6)
    assert g["reference"]["stages"][1]["test_acc"]["half"] == pytest.approx(0.049683, abs=2e-6)
    assert g["reference"]["stages"][0]["test_acc"]["half"] == pytest.approx(0.0)  # 0.70 three times
    # e2e - greedy, paired by seed: 0.03, 0.03, 0.00 -> mean 0.02, s = 0.017321, half = 4.3027 * 0.01 = 0.043027
    within = g["reference"]["within"]["e2e - greedy"]
    assert within["diff"] == pytest.approx(0.02) and within["half"] == pytest.approx(0.043027, abs=2e-6)
    assert within["resolved"] is False

    # k=3 - reference, Welch: equal variances and n, so df = 4; t(0.975, 4) = 2.7764;
    # se = sqrt(2 * 0.0004 / 3) = 0.016330 -> half 0.045338; +0.05 [0.004662, 0.095338]: resolved
    w = g["model.k=3"]["vs_reference"]["greedy"]["welch"]
    assert w["diff"] == pytest.approx(0.05) and w["df"] == pytest.approx(4.0)
    assert w["half"] == pytest.approx(0.045338, abs=2e-6) and w["resolved"] is True
    # paired by seed: 0.05, 0.07, 0.03 -> mean 0.05, s = 0.02, half 0.049683 -> [0.000317, 0.099683]: resolved
    p = g["model.k=3"]["vs_reference"]["greedy"]["paired"]
    assert p["half"] == pytest.approx(0.049683, abs=2e-6) and p["resolved"] is True
    # k=1 - reference: +0.01, Welch half 0.045338; paired 0.03, -0.01, 0.01: half 0.049683. Neither resolves it
    assert g["model.k=1"]["vs_reference"]["greedy"]["welch"]["resolved"] is False
    assert g["model.k=1"]["vs_reference"]["greedy"]["paired"]["half"] == pytest.approx(0.049683, abs=2e-6)

    # the critical layer per seed: seed 0 gains 0.1 point after stage 0 (< 0.3) while training accuracy rises
    assert g["reference"]["critical"] == {"per_seed": {"0": 0, "1": None, "2": None}, "counts": {"0": 1, "none": 2}}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| reference | 3 | 82.00 ± 4.97 | 84.00 ± 2.48 | reference | 0 (1x), none (2x) |" in md
    assert "+5.00 [+0.47, +9.53] |" in md and "+1.00 [-3.53, +5.53] unresolved" in md
    assert "cannot resolve (the paired interval where there is one, else Welch's, holds 0): model.k=1 (greedy)." in md
    assert (tmp_path / "report" / "runs.md").exists() and (tmp_path / "report" / "accuracy.png").stat().st_size > 0


def test_a_setting_that_changes_nothing_is_identical_not_unresolved():
    """Two outcomes with the same value for every seed (a fork that never touches what is compared): the
    difference is 0 with a zero-width interval; the report says "identical", and does not list it among the
    differences the seeds cannot resolve."""
    from cachetrain.study.report_groups import diff
    from cachetrain.study.stats import paired, welch

    values = {0: 0.81, 1: 0.83, 2: 0.86}
    same = paired(values, dict(values))
    assert same.identical and same.resolved is None and diff(same.to_dict()) == "+0.00 (identical)"
    # unpaired, the same values are two samples whose spread leaves a 0 difference unresolved
    apart = welch(list(values.values()), list(values.values()))
    assert not apart.identical and apart.resolved is False
    moved = paired(values, {k: v - 0.01 for k, v in values.items()})  # a constant shift: resolved, zero width
    assert not moved.identical and moved.resolved is True
