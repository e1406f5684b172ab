"""Closing the gap to end to end from a trained greedy network: fine-tuning it end to end (train.e2e_init: greedy,
in a fork at J that reuses every stage) and averaging the last auxiliary heads (`eval --heads`)."""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from tests.conftest import cli_in_process, tiny_run


def _trained(tmp_path):
    path, cfg = tiny_run(tmp_path, model={"stages": 2, "downsample": [1]},
                         data={"synthetic_train": 128, "synthetic_test": 64}, train={"probes": False})
    assert cli_in_process(["train", "--config", str(path)]).returncode == 0
    return cfg.run_path


def test_fine_tuning_starts_from_the_assembled_greedy_network_and_follows_its_stages(tmp_path):
    from cachetrain.config import load_config
    from cachetrain.run import Run
    from cachetrain.train.inputs import StageInputs
    from cachetrain.train.unit import EndToEnd

    parent, child = _trained(tmp_path), tmp_path / "tuned"
    assert cli_in_process(["eval", "--run", str(parent), "--heads", "2"]).returncode == 0
    r = cli_in_process(["fork", "--run", str(parent), "--at", "2", "--to", str(child), "--set", "train.e2e_init=greedy",
                        "--set", "train.e2e_epochs=1", "--set", "train.e2e_lr=0.001"])
    assert r.returncode == 0, r.stderr  # at J = model.stages: every stage reused, only the end-to-end network changes
    # so are the averaged heads' scores, which measured the very same stages
    assert (child / "heads.jsonl").read_text() == (parent / "heads.jsonl").read_text()

    run = Run(load_config(child / "config.yaml"))
    unit = EndToEnd(run)
    model = unit.build(2, unit.settings()).model.eval()
    assert unit.settings().lr == 0.001 and unit.settings().epochs == 1
    inputs = StageInputs(run)
    greedy = nn.Sequential(inputs.trained_stage(0), inputs.trained_stage(1), inputs.trained_head(1))
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), greedy(x))  # its initial weights are the greedy stages' and the last head's

    assert cli_in_process(["e2e", "--run", str(child)]).returncode == 0
    assert "e2e: already trained" in cli_in_process(["e2e", "--run", str(child)]).stdout
    # stage 1 with other weights (as a retrain on other inputs would leave it): what the fine-tuning started from
    # changed, so its checkpoint is stale and e2e trains again
    ck = run.state.checkpoint(1)
    run.checkpoints.save(dataclasses.replace(ck, weights_hash="0" * len(ck.weights_hash)))
    again = cli_in_process(["e2e", "--run", str(child)])
    assert again.returncode == 0 and "fine-tuning epoch 1/1" in again.stdout and "already trained" not in again.stdout


def test_fine_tuning_needs_the_greedy_stages_first(tmp_path):
    path, _ = tiny_run(tmp_path, train={"e2e_init": "greedy"})
    r = cli_in_process(["e2e", "--config", str(path)])
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "train.e2e_init: 'greedy' fine-tunes the trained greedy stages, and stage 0 is untrained" in r.stderr
    assert "run: cachetrain train --config" in r.stderr


def test_averaged_heads_are_scored_and_recorded_once_per_trained_network(tmp_path):
    run = _trained(tmp_path)
    r = cli_in_process(["eval", "--run", str(run), "--heads", "3"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (run / "heads.jsonl").read_text().splitlines()]
    assert [(h["heads"], h["stages"]) for h in rows] == [(1, [1]), (2, [0, 1])]  # at most J = 2 heads
    raw = r.stdout.split("raw test images")[1].splitlines()[0]
    assert f"{100 * rows[0]['test_acc']:.2f}%" in raw  # one head is the assembled network: eval's own accuracy
    assert all(0 <= h["test_acc"] <= 1 and 0 <= h["val_acc"] <= 1 for h in rows)
    assert cli_in_process(["eval", "--run", str(run), "--heads", "-1"]).returncode == 2
