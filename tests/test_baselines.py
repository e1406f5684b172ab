"""The two baselines the cache is measured against: greedy with recomputation, and end to end."""

from __future__ import annotations

import pytest
import torch

from cachetrain.cli import main
from cachetrain.run import StageState
from cachetrain.models.factory import e2e_network
from cachetrain.train.recompute import RecomputeSource
from tests.conftest import greedy_of, tiny_greedy, tiny_run


def test_cache_none_recomputes_through_frozen_stages_and_writes_no_cache(tmp_path):
    g = tiny_greedy(tmp_path / "run", cache={"mode": "none"})
    rows = g.train_all()
    assert [r.state for r in rows] == [StageState.TRAINED] * 3 and all(r.cache is None for r in rows)
    assert not (tmp_path / "run" / "cache").exists()
    src = g.inputs.input_source(2)
    assert isinstance(src, RecomputeSource) and len(src.frozen) == 2
    x, _ = next(src.eval_batches("test", 16))
    with torch.no_grad():
        expected = g.inputs.trained_stage(1)(g.inputs.trained_stage(0)(next(g.run.data.eval_batches("test", 16))[0]))
    assert torch.equal(x, expected) and src.forward_calls == 1


@pytest.mark.slow
def test_recompute_and_cache_train_the_same_architecture_to_similar_accuracy(tmp_path):
    accs = {}
    for mode in ("all", "none"):
        accs[mode] = tiny_greedy(tmp_path / mode, cache={"mode": mode}, train={"epochs": 2}).train_all()[-1].test_acc
    assert min(accs.values()) > 0.5 and abs(accs["all"] - accs["none"]) < 0.15, accs


def test_e2e_trains_the_assembled_network_and_resumes(tmp_path, capsys):
    path, cfg = tiny_run(tmp_path, train={"epochs": 1, "e2e_epochs": 2})
    assert main(["e2e", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "e2e epoch 2/2" in out and "end-to-end test accuracy" in out
    ck = torch.load(tmp_path / "run" / "e2e" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["test_acc"] > 0.5
    g = greedy_of(cfg)
    net = e2e_network(g.cfg, g.run.data.sample_shape, g.run.data.num_classes)
    assert len(net) == 4 and all(isinstance(m, torch.nn.Sequential) for m in net)  # 3 stages + the last stage's head
    assert main(["e2e", "--config", str(path)]) == 0
    assert "already trained" in capsys.readouterr().out


def test_plan_mode_without_a_plan_names_the_command(tmp_path, capsys):
    path, _ = tiny_run(tmp_path, cache={"mode": "plan"})
    assert main(["train", "--config", str(path)]) == 2
    assert f"plan.json, which plan makes; run: cachetrain plan --config {path}" in capsys.readouterr().err
