"""Per-stage training settings: `stages.<j>.<key>` overrides, the slowdown rule, early stopping on
validation loss. What a user sets must reach the optimizer and the schedule (seen in the metrics rows)."""

from __future__ import annotations

import json

import pytest
import torch

from cachetrain.config import Config, ConfigError, load_config
from tests.conftest import cli_in_process, synthetic_raw, tiny_greedy, tiny_run


def metrics(run, j):
    return [json.loads(line) for line in (run / "stages" / f"stage_{j}" / "metrics.jsonl").read_text().splitlines()]


def test_stage_overrides_reach_the_optimizer_and_the_schedule(tmp_path):
    cfg_file, _ = tiny_run(tmp_path, train={"epochs": 1, "lr": 0.05, "schedule": "constant"})
    r = cli_in_process(["train", "--config", str(cfg_file), "--set", "stages.1.lr=0.01", "--set", "stages.1.epochs=2",
                        "--set", "train.probes=false"])
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    rows0, rows1, rows2 = metrics(run, 0), metrics(run, 1), metrics(run, 2)
    assert [r["epoch"] for r in rows0] == [1] and [r["epoch"] for r in rows2] == [1]
    assert [r["epoch"] for r in rows1] == [1, 2]  # stages.1.epochs
    assert rows0[-1]["lr"] == pytest.approx(0.05) and rows2[-1]["lr"] == pytest.approx(0.05)
    assert rows1[-1]["lr"] == pytest.approx(0.01)  # stages.1.lr, the constant schedule keeps it


def test_slowdown_trains_early_stages_less():
    cfg = load_config(None, ["model.stages=4", "train.epochs=8", "train.slowdown=0.5"])
    assert [cfg.stage_train(j).epochs for j in range(4)] == [1, 2, 4, 8]  # 8 * 0.5 ** (3 - j)
    cfg = load_config(None, ["model.stages=3", "train.lr=0.1", "train.slowdown=0.5", "train.slowdown_of=lr",
                             "stages.0.lr=0.2"])
    assert [cfg.stage_train(j).lr for j in range(3)] == pytest.approx([0.2, 0.05, 0.1])  # an override wins
    assert all(cfg.stage_train(j).epochs == cfg.train.epochs for j in range(3))


@pytest.mark.parametrize("sets, key", [(["stages.4.lr=0.1"], "stages"), (["stages.1.lr=0"], "stages.1.lr"),
                                       (["stages.one.lr=0.1"], "stages.one"), (["stages.1.width=3"], "stages.1.width"),
                                       (["train.slowdown=1.5"], "train.slowdown"),
                                       (["train.patience=-1"], "train.patience")])
def test_bad_stage_settings_name_the_key(tmp_path, sets, key):
    cfg_file, _ = tiny_run(tmp_path)
    r = cli_in_process(["status", "--config", str(cfg_file), *[a for s in sets for a in ("--set", s)]])
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr


def test_saved_config_keeps_only_the_overrides_set(tmp_path):
    cfg = Config.from_dict(synthetic_raw(tmp_path / "run", stages={2: {"lr": 0.01}}))
    assert cfg.to_dict()["stages"] == {2: {"lr": 0.01}}
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_early_stopping_keeps_the_best_validation_epoch(tmp_path):
    """A learning rate far too high makes validation loss rise after the first epoch: patience 1 stops the
    stage after epoch 2 and keeps epoch 1's weights, whose test accuracy is the one reported."""
    greedy = tiny_greedy(tmp_path / "run", train={"epochs": 5, "patience": 1, "lr": 0.05, "schedule": "constant"},
                         data={"synthetic_noise": 120.0, "val_samples": 96})
    acc = greedy.train_stage(0)
    rows = metrics(tmp_path / "run", 0)
    last = rows[-1]
    best = min(rows, key=lambda r: r["val_loss"])
    assert last["selected_epoch"] == best["epoch"]
    # stopped once the loss had not improved for one epoch, or ran to the end
    assert len(rows) == min(5, best["epoch"] + 1)
    assert acc == pytest.approx(best["test_acc"])
    ck = greedy.state.checkpoint(0)
    assert ck.epoch == ck.epochs  # the stage counts as trained
    kept = {k: v for k, v in ck.selection["best_state"].items() if k.startswith("stage.")}
    assert all(torch.equal(ck.model[k.removeprefix("stage.")], v) for k, v in kept.items())


def test_patience_needs_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match="train.patience"):
        Config.from_dict(synthetic_raw(tmp_path / "run", train={"patience": 2}, data={"val_samples": 0}))


def test_selection_stops_after_patience_epochs_without_improvement():
    from torch import nn

    from cachetrain.train.trainer import Selection

    model = nn.Linear(2, 2)
    sel = Selection(patience=2)
    stops = []
    for epoch, val_loss in enumerate([1.0, 0.8, 0.9, 0.95, 0.7], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights of each epoch are told apart
        stops.append(sel.observe(epoch, val_loss, test_acc=epoch / 10, model=model))
        if stops[-1]:
            break  # fit stops here; epoch 5's better loss is never seen
    assert stops == [False, False, False, True]  # epochs 3 and 4 did not improve on epoch 2
    assert sel.best_epoch == 2 and sel.best_test_acc == pytest.approx(0.2)
    assert torch.all(sel.best_state["weight"] == 2)
    again = Selection.from_checkpoint(sel.to_checkpoint(), 2)  # what a resumed fit starts from
    assert (again.best_epoch, again.best_val_loss) == (2, 0.8)
