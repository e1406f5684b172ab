"""cachetrain.study: linear probes, linear CKA, the critical-layer rule and the report, on hand-made cases and
fabricated run directories (new-format, old-format, several runs, not a run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cachetrain.errors import ConfigError
from cachetrain.study.cka import cka_features, linear_cka
from cachetrain.study.critical import critical_layer
from cachetrain.study.probe import PROBE_POOLS, fit_probe, pool_features
from cachetrain.study.report import write_report


# -- probes ------------------------------------------------------------------------------------------------------
def blobs(n: int, d: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def test_probe_on_linearly_separable_features_is_near_perfect():
    train, test = blobs(400, 20, 4, 8.0, 0), blobs(300, 20, 4, 8.0, 1)
    r = fit_probe((train[0].half(), train[1]), {"val": test, "test": test}, 4)  # float16 like the caches
    assert r["train_acc"] >= 0.99 and r["val_acc"] >= 0.99 and r["test_acc"] >= 0.99
    assert r["dims"] == 20 and r["train_samples"] == 400 and r["iterations"] >= 1 and r["seconds"] >= 0


def test_probe_on_random_labels_is_at_chance_on_held_out_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1600, 50, generator=g), torch.randint(0, 4, (1600,), generator=g)
    r = fit_probe((x[:600], y[:600]), {"test": (x[600:], y[600:])}, 4)
    assert r["train_acc"] > 0.35  # it fits noise on the training set...
    assert abs(r["test_acc"] - 0.25) < 0.07  # ...which tells nothing about held-out samples


def test_probe_is_deterministic_for_a_seed():
    train, test = blobs(300, 16, 3, 0.5, 2), blobs(200, 16, 3, 0.5, 3)
    a = fit_probe(train, {"test": test}, 3, seed=5)
    b = fit_probe(train, {"test": test}, 3, seed=5)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_probe_rejects_labels_outside_the_classes():
    x, y = torch.randn(10, 3), torch.arange(10)
    with pytest.raises(ValueError, match="labels outside"):
        fit_probe((x, y), {}, 4)


def test_pool_features_shapes_and_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float16).reshape(2, 3, 4, 4)
    gap, grid = pool_features(x, "gap"), pool_features(x, "2x2")
    assert PROBE_POOLS == ("gap", "2x2")
    assert gap.shape == (2, 3) and gap.dtype == torch.float32
    assert torch.equal(gap, x.float().mean(dim=(2, 3)))
    assert grid.shape == (2, 12)
    assert grid[0, 0] == x[0, 0, :2, :2].float().mean()  # top-left quadrant of channel 0
    with pytest.raises(ValueError, match="2x2"):
        pool_features(torch.zeros(2, 3, 1, 1), "2x2")
    with pytest.raises(ValueError, match="unknown pool"):
        pool_features(x, "max")


# -- CKA ---------------------------------------------------------------------------------------------------------
def cka_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s formula with the centring matrix spelled out, as an independent reference."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def test_cka_is_one_for_the_same_representation_up_to_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 30))
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3 * x + rng.standard_normal(30)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(x @ q).float()) == pytest.approx(1.0, abs=1e-5)


def test_cka_is_near_zero_for_independent_noise_and_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((500, 10)), rng.standard_normal((500, 10))
    assert linear_cka(x, y) < 0.1
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


@pytest.mark.parametrize("n,d1,d2", [(40, 300, 200), (300, 5, 8)])  # the n x n form, then the d x d form
def test_cka_matches_the_definition_for_wide_and_tall_data(n, d1, d2):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, d1))
    y = x[:, :min(d1, d2)] @ rng.standard_normal((min(d1, d2), d2)) + rng.standard_normal((n, d2))
    assert linear_cka(x, y) == pytest.approx(cka_by_definition(x, y), rel=1e-9)


def test_cka_flattens_feature_maps_and_checks_sample_counts():
    x = torch.randn(50, 4, 3, 3)
    assert linear_cka(x, x.reshape(50, -1)) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, torch.randn(49, 36))


def test_cka_features_pool_to_at_most_4x4():
    assert cka_features(torch.randn(2, 3, 28, 28)).shape == (2, 48)
    assert cka_features(torch.randn(2, 3, 2, 7)).shape == (2, 3 * 2 * 4)
    small = torch.randn(2, 5, 3, 3)
    assert torch.equal(cka_features(small), small.flatten(1))  # already small enough: untouched


# -- critical layer ----------------------------------------------------------------------------------------------
def test_critical_layer_finds_a_plateau_after_stage_2():
    val = [0.80, 0.85, 0.88, 0.881, 0.882, 0.883]
    train = [0.80, 0.86, 0.90, 0.93, 0.96, 0.98]
    c = critical_layer(val, train)
    assert c["stage"] == 2 and c["delta"] == 0.3
    assert "100*(val[i]-val[j]) < 0.3*(i-j)" in c["rule"] and "train[J-1] > train[j]" in c["rule"]


def test_critical_layer_none_while_validation_still_rises():
    c = critical_layer([0.80, 0.82, 0.84, 0.86], [0.8, 0.85, 0.9, 0.95])
    assert c["stage"] is None and "still gains" in c["reason"]


def test_critical_layer_none_when_training_accuracy_stops_rising():
    c = critical_layer([0.80, 0.86, 0.861, 0.862], [0.90, 0.95, 0.97, 0.95])
    assert c["stage"] is None and "does not keep rising" in c["reason"]


def test_critical_layer_with_missing_values_says_why():
    c = critical_layer([None] * 4, [0.8, 0.85, 0.9, 0.95])
    assert c["stage"] is None and c["reason"] == "no validation accuracy recorded"
    c = critical_layer([0.8, None, 0.9, 0.9], [0.8, 0.85, 0.9, 0.95])
    assert c["stage"] is None and "stage 1" in c["reason"]
    c = critical_layer([0.8, 0.8, 0.8], [0.8, None, 0.9])
    assert c["stage"] is None and "training accuracy missing" in c["reason"]
    assert critical_layer([0.8], [0.9])["stage"] is None


def test_critical_layer_delta_is_a_strict_bound_in_points_per_stage():
    val, train = [0.900, 0.903, 0.906], [0.90, 0.95, 0.99]  # exactly 0.3 points a stage
    assert critical_layer(val, train, delta=0.3)["stage"] is None
    assert critical_layer(val, train, delta=0.31)["stage"] == 0
    assert critical_layer([0.900, 0.9029, 0.9058], train, delta=0.3)["stage"] == 0  # 0.29 a stage


# -- report ------------------------------------------------------------------------------------------------------
OLD_KEYS_ROW = {"train_loss": 0.5, "lr": 0.01, "samples_per_s": 1000.0}


def write_jsonl(path: Path, rows: list[dict], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def make_run(root: Path, name: str, val: list[float], train_eval: list[float], *, full: bool = True,
             config: bool = True) -> Path:
    """A run directory with J = len(val) stages of 3 epochs each; `full` adds the new diagnostics, e2e, probes
    and CKA. Stage 1 early-stops at epoch 2; stage 0 was retrained (epochs 1..3 written twice)."""
    run = root / name
    J = len(val)
    if config:
        (run).mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": {"arch": "layercnn", "stages": J,
                                                                                   "k": 2}}))
    for j in range(J):
        rows = []
        for epoch in (1, 2, 3):
            off = 0.01 * (epoch - 3)  # the last epoch has exactly val[j], train_eval[j]
            row = {"stage": j, "k": 2, "epoch": epoch, "train_acc": train_eval[j] - 0.02 + off,
                   "test_acc": val[j] - 0.005 + off, **OLD_KEYS_ROW}
            if full:
                row.update(val_acc=val[j] + off, val_loss=0.4, test_loss=0.41, train_eval_acc=train_eval[j] + off,
                           train_eval_loss=0.3, gap=train_eval[j] - val[j])
            rows.append(row)
        if j == 0:
            rows = [dict(r, test_acc=0.1) for r in rows] + rows  # a retrain: the later rows win
        if j == 1 and full:
            rows[1] = dict(rows[1], val_acc=val[1], train_eval_acc=train_eval[1], gap=train_eval[1] - val[1])
            rows[2] = dict(rows[2], val_acc=val[1] - 0.05, selected_epoch=2)  # early stopping kept epoch 2
        write_jsonl(run / "stages" / f"stage_{j}" / "metrics.jsonl", rows)
    if full:
        write_jsonl(run / "e2e" / "metrics.jsonl", [{"epoch": e, "train_acc": 0.9, "test_acc": 0.9 + 0.01 * e,
                                                     "val_acc": 0.9} for e in (1, 2, 3)])
        probes = [{"net": net, "stage": j, "pool": pool, "dims": 64, "train_acc": 0.9, "val_acc": 0.8 + 0.01 * j,
                   "test_acc": 0.79 + 0.01 * j, "train_samples": 500, "seconds": 0.5}
                  for net in ("greedy", "e2e") for j in range(J) for pool in ("gap", "2x2")
                  if pool == "gap" or j < J - 1]  # no 2x2 probe at the last stage, as for a 1x1 output
        write_jsonl(run / "probes.jsonl", [dict(probes[0], test_acc=0.1)] + probes)  # the last row per key wins
        write_jsonl(run / "cka.jsonl", [{"stage": j, "cka": 0.9 - 0.1 * j, "samples": 1000, "features": "pool4x4",
                                         "seconds": 0.1} for j in range(J)])
    return run


PLATEAU_VAL = [0.80, 0.85, 0.88, 0.881, 0.882]
RISING_TRAIN = [0.80, 0.86, 0.90, 0.93, 0.96]


def assert_plots(out: Path) -> None:
    for name in ("accuracy", "probes", "gap", "cka"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name


def test_report_on_a_run_with_every_diagnostic(tmp_path):
    run = make_run(tmp_path, "full", PLATEAU_VAL, RISING_TRAIN)
    out = tmp_path / "out"
    report = write_report([run], out)
    r = report["runs"][0]
    assert [s["stage"] for s in r["stages"]] == [0, 1, 2, 3, 4]
    s0, s1, s4 = r["stages"][0], r["stages"][1], r["stages"][4]
    assert s0["test_acc"] == pytest.approx(0.80 - 0.005)  # the retrained rows, not the first ones
    assert s1["selected_epoch"] == 2 and s1["epochs"] == 3 and s1["val_acc"] == pytest.approx(0.85)
    assert s4["gap"] == pytest.approx(0.96 - 0.882) and s4["cka"] == pytest.approx(0.5)
    assert s0["probes"]["greedy"]["gap"]["test_acc"] == pytest.approx(0.79)
    assert s4["probes"]["greedy"]["2x2"] is None and s4["probes"]["e2e"]["gap"]["val_acc"] == pytest.approx(0.84)
    assert r["e2e"]["test_acc"] == pytest.approx(0.93)
    assert r["critical"]["stage"] == 2 and r["critical"]["train_source"] == "train_eval_acc"
    assert json.loads((out / "report.json").read_text()) == report

    md = (out / "report.md").read_text()
    assert "| stage | k | epochs |" in md
    assert "| 1 | 2 | 2 of 3 | " in md and "| 85.00 |" in md
    assert "**Critical layer: stage 2**" in md and "100*(val[i]-val[j]) < 0.3*(i-j)" in md
    assert "End to end: test accuracy 93.00%" in md
    assert "greedy probes (2x2): missing at stage 4" in md
    assert_plots(out)


def test_report_on_a_run_from_before_the_diagnostics(tmp_path):
    run = make_run(tmp_path, "old", [0.8, 0.85, 0.86], [0.8, 0.9, 0.95], full=False)
    path = run / "stages" / "stage_2" / "metrics.jsonl"
    path.write_text(path.read_text().replace('"test_acc": 0.855', '"test_acc": NaN') + '{"stage": 2, "ep')
    out = tmp_path / "out"
    report = write_report([run], out)
    r = report["runs"][0]
    assert all(s["val_acc"] is None and s["gap"] is None and s["cka"] is None for s in r["stages"])
    assert r["stages"][2]["test_acc"] is None  # NaN in the file: missing, and report.json stays valid JSON
    assert r["e2e"] is None and r["critical"]["stage"] is None
    assert r["critical"]["reason"].startswith("no validation accuracy recorded")
    md = (out / "report.md").read_text()
    assert "**Critical layer: none** (no validation accuracy recorded" in md
    assert "| 0 | 2 | 3 | 78.00 | — | — | 79.50 | — |" in md
    for gone in ("validation accuracy (val_acc): not recorded", "no e2e/metrics.jsonl", "no probes.jsonl",
                 "no cka.jsonl", "1 unreadable line(s) skipped"):
        assert gone in md
    assert_plots(out)


def test_report_without_a_config_counts_stages_from_the_folders(tmp_path):
    run = make_run(tmp_path, "bare", [0.8, 0.85], [0.8, 0.9], full=False, config=False)
    (run / "stages" / "stage_3").mkdir()  # a stage folder made but not trained yet
    r = write_report([run], tmp_path / "out")["runs"][0]
    assert len(r["stages"]) == 4 and r["stages"][3]["epochs"] is None and r["arch"] is None
    assert "metrics: no finished epoch at stages 2, 3" in r["missing"]


def test_report_overlays_runs_given_with_vs(tmp_path):
    a = make_run(tmp_path, "k2", PLATEAU_VAL, RISING_TRAIN)
    b = make_run(tmp_path, "k3", [0.80, 0.83, 0.86, 0.89], [0.8, 0.85, 0.9, 0.95])
    out = tmp_path / "out"
    report = write_report([a, b], out, delta=0.5)
    assert [r["label"] for r in report["runs"]] == ["k2", "k3"]
    assert [r["critical"]["stage"] for r in report["runs"]] == [2, None]
    md = (out / "report.md").read_text()
    assert "## k2" in md and "## k3" in md and "| k3 | layercnn | 4 |" in md and "0.5*(i-j)" in md
    assert_plots(out)


def test_report_labels_runs_with_the_same_folder_name_apart(tmp_path):
    a = make_run(tmp_path / "a", "run", [0.8, 0.85], [0.8, 0.9], full=False)
    b = make_run(tmp_path / "b", "run", [0.8, 0.85], [0.8, 0.9], full=False)
    assert [r["label"] for r in write_report([a, b], tmp_path / "out")["runs"]] == ["a/run", "b/run"]


def test_report_on_a_path_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        write_report([tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty is not a run directory: no stages/"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ConfigError, match="--delta"):
        write_report([make_run(tmp_path, "ok", [0.8, 0.9], [0.8, 0.9])], tmp_path / "out", delta=-1)
