"""The cache planner: exact under the budget (checked by brute force), and training follows a plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cachetrain.cache import CacheState
from cachetrain.cli import main
from cachetrain.config import Config
from cachetrain.greedy import Greedy
from cachetrain.planner import StageCost, Workload, brute_force, evaluate, parse_size, plan
from cachetrain.recompute import RecomputeSource
from tests.conftest import synthetic_raw, write_config


def random_costs(rng, depth):
    return [StageCost(j, (1, 1, 1), float(rng.uniform(1, 10)), float(rng.uniform(1, 30)),
                      {"float16": int(rng.integers(1, 100)), "uint8": int(rng.integers(1, 50))})
            for j in range(depth)]


@pytest.mark.parametrize("seed", range(40))
def test_plan_is_optimal_under_the_budget(seed):
    rng = np.random.default_rng(seed)
    costs = random_costs(rng, int(rng.integers(2, 8)))
    w = Workload(train=int(rng.integers(10, 1000)), test=int(rng.integers(0, 100)), epochs=int(rng.integers(1, 5)),
                 views=int(rng.integers(1, 3)))
    everything = evaluate(costs, w, tuple(range(len(costs) - 1)), "float16").disk_bytes
    budget = int(rng.uniform(0, 1.2) * everything)
    got, best = plan(costs, w, budget, "float16"), brute_force(costs, w, budget, "float16")
    assert got.disk_bytes <= budget
    assert got.flops == pytest.approx(best.flops)
    assert evaluate(costs, w, got.cached, "float16").flops == pytest.approx(got.flops)


def test_unlimited_budget_caches_every_stage_but_the_last_and_zero_caches_nothing():
    costs = random_costs(np.random.default_rng(0), 5)
    w = Workload(1000, 100, 3)
    assert plan(costs, w, 10**18, "float16").cached == (0, 1, 2, 3)
    assert plan(costs, w, 0, "float16").cached == ()


def test_parse_size():
    assert parse_size("2TB") == 2 * 10**12 and parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("500G") == 500 * 10**9 and parse_size("123") == 123
    with pytest.raises(ValueError, match="expected a size like 2TB"):
        parse_size("lots")


def test_training_follows_a_plan_that_skips_a_cache(tmp_path, capsys):
    raw = synthetic_raw(tmp_path / "run", cache={"mode": "plan"})
    path = write_config(tmp_path / "c.yaml", raw)
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({"cached": [1]}))  # stage 0's outputs are never stored
    assert main(["train", "--config", str(path)]) == 0
    g = Greedy(Config.from_dict(raw))
    assert [r.state for r in g.status()] == ["trained"] * 3
    assert not (run / "cache" / "stage_0").exists()
    assert g.cache_state(1)[0] is CacheState.COMPLETE
    src = g.input_source(1)
    assert isinstance(src, RecomputeSource) and len(src.frozen) == 1  # images -> frozen stage 0
    assert not isinstance(g.input_source(2), RecomputeSource)  # reads cache 1
    assert g.evaluate_network()["agreement"] >= 0.99


def test_plan_command_saves_a_plan_within_budget(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    stage_bytes = 8 * 16 * 16 * 2 * (384 + 128)  # stage 0's output, fp16, both splits
    assert main(["plan", "--config", str(path), "--disk-budget", str(stage_bytes)]) == 0
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["disk_bytes"] <= stage_bytes and len(saved["cached"]) == 1
    assert "cache plan for 384 + 128 samples" in capsys.readouterr().out
    assert main(["plan", "--config", str(path), "--disk-budget", "lots"]) == 2
