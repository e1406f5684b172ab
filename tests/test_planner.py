"""The cache planner: exact under the budget (checked by brute force), its FLOP prediction of the cached /
recompute ratio (by hand and by the properties a wrong model would break), and training follows a plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cachetrain.cache import CacheState
from cachetrain.run import StageState
from cachetrain.cli import main
from cachetrain.config import Config
from cachetrain.plan.planner import (FLOPS, Rates, StageCost, Workload, brute_force, cost_ratio, describe, evaluate,
                                parse_size, plan)
from cachetrain.train.recompute import RecomputeSource
from tests.conftest import greedy_of, synthetic_raw, write_config


def random_costs(rng, depth):
    return [StageCost(j, (1, 1, 1), float(rng.uniform(1, 10)), float(rng.uniform(1, 30)),
                      {"float16": int(rng.integers(1, 100)), "uint8": int(rng.integers(1, 50))})
            for j in range(depth)]


@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_plan_is_optimal_under_the_budget(seed, timed):
    rng = np.random.default_rng(seed)
    costs = random_costs(rng, int(rng.integers(2, 8)))
    w = Workload(train=int(rng.integers(10, 1000)), test=int(rng.integers(0, 100)), epochs=int(rng.integers(1, 5)),
                 views=int(rng.integers(1, 3)))
    # rates that put reading, writing and computing within a factor of a few of each other
    model = Rates(*rng.uniform(1, 20, size=3)) if timed else FLOPS
    everything = evaluate(costs, w, tuple(range(len(costs) - 1)), "float16").disk_bytes
    budget = int(rng.uniform(0, 1.2) * everything)
    got, best = plan(costs, w, budget, "float16", model), brute_force(costs, w, budget, "float16", model)
    assert got.disk_bytes <= budget
    assert got.cost == pytest.approx(best.cost)
    assert evaluate(costs, w, got.cached, "float16", model).cost == pytest.approx(got.cost)


def test_timed_plan_recomputes_what_is_slower_to_read_than_to_compute():
    """Stage 0 is cheap and wide (reading its output takes longer than recomputing it), stages 1-2
    are expensive and narrow: the seconds model caches 1 and 2 but not 0; FLOPs cache everything."""
    costs = [StageCost(0, (1, 1, 1), 1.0, 3.0, {"float16": 100}), StageCost(1, (1, 1, 1), 50.0, 150.0, {"float16": 4}),
             StageCost(2, (1, 1, 1), 50.0, 150.0, {"float16": 2}), StageCost(3, (1, 1, 1), 50.0, 150.0, {"float16": 2})]
    w = Workload(1000, 100, 10)
    rates = Rates(flops_per_s=100.0, read_bytes_per_s=10.0, write_bytes_per_s=1000.0)
    assert plan(costs, w, 10**9, "float16").cached == (0, 1, 2)
    timed = plan(costs, w, 10**9, "float16", rates)
    assert timed.cached == (1, 2)
    # by hand, stage by stage: max(compute, read) per sample and epoch, then each caching pass
    n, e = 1100, 10
    by_hand = (e * (1000 * 0.03 + 100 * 0.0)  # stage 0 trains on images
               + e * (1000 * (1.5 + 0.01) + 100 * 0.01) + n * max(0.51, 4 / 1000)  # stage 1 recomputes 0; cache 1
               + e * (1000 * max(1.5, 0.4) + 100 * 0.4) + n * max(0.5, 0.4, 0.002)  # stage 2 reads 1; cache 2
               + e * (1000 * max(1.5, 0.2) + 100 * 0.2))  # stage 3 reads 2
    assert timed.cost == pytest.approx(by_hand)
    # instant storage: the seconds model agrees with FLOPs
    assert plan(costs, w, 10**9, "float16", Rates(100.0, 1e12, 1e12)).cached == (0, 1, 2)


def test_timed_cost_counts_each_epochs_test_evaluation():
    """Two stages; per sample: forwards 2 and 4 FLOPs, evaluations (block + head) 3 and 6, training steps 6
    and 12; 10 B per stored sample. 1 FLOP/s, reads 5 B/s, writes 2 B/s; 10 training and 5 test samples,
    2 epochs. Recomputing: stage 0 takes 2 * (10 * 6 + 5 * 3) = 150 s, stage 1 adds stage 0's forward:
    2 * (10 * (12 + 2) + 5 * (6 + 2)) = 360 s. Caching stage 0: its pass is bound by the write (10 B at 2 B/s,
    15 samples: 75 s), and stage 1 then computes for longer than it reads (2 s a sample):
    2 * (10 * 12 + 5 * 6) = 300 s."""
    costs = [StageCost(0, (1, 1, 1), 2.0, 6.0, {"float16": 10}, 3.0),
             StageCost(1, (1, 1, 1), 4.0, 12.0, {"float16": 10}, 6.0)]
    w, rates = Workload(train=10, test=5, epochs=2), Rates(1.0, 5.0, 2.0)
    assert evaluate(costs, w, (), "float16", rates).cost == pytest.approx(150 + 360)
    assert evaluate(costs, w, (0,), "float16", rates).cost == pytest.approx(150 + 75 + 300)
    assert plan(costs, w, 10**9, "float16", rates).cached == ()  # caching loses here: 525 s against 510
    assert cost_ratio(costs, w, (0,), "float16", rates) == pytest.approx(525 / 510)


def test_plan_names_the_read_rate_each_cached_input_needs():
    """Three stages, stage 0 cached: stage 1 trains at 12 FLOPs a sample, so at 120 FLOP/s it takes 10 samples/s
    of 10 B = 100 B/s from the cache; stage 2 recomputes stage 1 (4 FLOPs) on top of its own 20: 5 samples/s,
    50 B/s. Stage 0 reads the images: nothing to say. Without measured rates nothing is claimed."""
    costs = [StageCost(0, (1, 1, 1), 2.0, 6.0, {"float16": 10}, 3.0),
             StageCost(1, (1, 1, 1), 4.0, 12.0, {"float16": 10}, 6.0),
             StageCost(2, (1, 1, 1), 8.0, 20.0, {"float16": 10}, 9.0)]
    w = Workload(train=10, test=5, epochs=2)
    chosen = evaluate(costs, w, (0,), "float16", Rates(120.0, 5.0, 2.0))
    got = [s["input_bytes_per_s"] for s in describe(costs, w, chosen, "float16", Rates(120.0, 5.0, 2.0))["stages"]]
    assert got == [None, pytest.approx(100.0), pytest.approx(50.0)]
    assert all(s["input_bytes_per_s"] is None for s in describe(costs, w, chosen, "float16")["stages"])


def _stages(depth: int, forward: float = 1.0, train: float = 3.0) -> list[StageCost]:
    return [StageCost(j, (1, 1, 1), forward, train, {"float16": 1}, forward) for j in range(depth)]


def test_predicted_ratio_is_below_one_and_falls_with_depth():
    """Caching every stage but the last against recomputing every input: with a positive recompute cost
    and more than one epoch the cache must win, and win by more as the frozen prefix grows."""
    w = Workload(train=100, test=10, epochs=5)
    ratios = [cost_ratio(_stages(depth), w, range(depth - 1)) for depth in range(2, 9)]
    assert all(0 < r < 1 for r in ratios)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    # nothing cached is the recompute run itself
    assert cost_ratio(_stages(4), w, ()) == pytest.approx(1.0)
    # the more a stage's own training costs, the less the frozen forwards matter: the ratio rises toward 1
    by_train = [cost_ratio(_stages(4, train=t), w, range(3)) for t in (1.0, 10.0, 100.0, 1000.0)]
    assert all(a < b < 1 for a, b in zip(by_train, by_train[1:]))


def test_one_epoch_of_two_stages_costs_the_same_cached_or_recomputed():
    """With one epoch, caching stage 0 forwards every sample through it once, and so does recomputing it
    for stage 1's only epoch: the same FLOPs either way."""
    costs = [StageCost(0, (1, 1, 1), 7.0, 20.0, {"float16": 1}, 9.0),
             StageCost(1, (1, 1, 1), 5.0, 15.0, {"float16": 1}, 6.0)]
    assert cost_ratio(costs, Workload(train=50, test=20, epochs=1), (0,)) == pytest.approx(1.0)
    assert cost_ratio(costs, Workload(train=50, test=20, epochs=2), (0,)) < 1


def test_describe_reports_the_same_ratio():
    costs = random_costs(np.random.default_rng(1), 5)
    w = Workload(1000, 100, 3)
    chosen = plan(costs, w, 10**18, "float16")
    d = describe(costs, w, chosen, "float16")
    assert d["total_vs_recompute_everything"] == pytest.approx(cost_ratio(costs, w, chosen.cached))
    assert d["cost_constant"] == pytest.approx(sum(3 * 1000 * c.train_flops for c in costs))  # no eval FLOPs given


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
    g = greedy_of(Config.from_dict(raw))
    assert [r.state for r in g.state.status()] == [StageState.TRAINED] * 3
    assert not (run / "cache" / "stage_0").exists()
    assert g.state.cache_state(1)[0] is CacheState.COMPLETE
    src = g.inputs.input_source(1)
    assert isinstance(src, RecomputeSource) and len(src.frozen) == 1  # images -> frozen stage 0
    assert not isinstance(g.inputs.input_source(2), RecomputeSource)  # reads cache 1
    assert g.evaluate_network()["agreement"] >= 0.99


def test_plan_command_saves_a_plan_within_budget(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    stage_bytes = 8 * 16 * 16 * 2 * (384 + 128)  # stage 0's output, fp16, every split (train, val, test)
    assert main(["plan", "--config", str(path), "--disk-budget", str(stage_bytes)]) == 0
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["disk_bytes"] <= stage_bytes and len(saved["cached"]) == 1
    assert "cache plan for 352 + 160 samples" in capsys.readouterr().out  # 32 of the 384 held out for validation
    assert main(["plan", "--config", str(path), "--disk-budget", "lots"]) == 2
    err = capsys.readouterr()
    assert main(["plan", "--config", str(path), "--flop-rate", "1T", "--read-rate", "1GB", "--write-rate", "1GB"]) == 0
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["cost_unit"] == "s" and saved["rates"]["read_bytes_per_s"] == 10**9
    assert "TFLOP/s" in capsys.readouterr().out
    assert main(["plan", "--config", str(path), "--flop-rate", "1T"]) == 2
    assert "missing --read-rate --write-rate" in capsys.readouterr().err
    assert main(["plan", "--config", str(path), "--flop-rate", "fast", "--read-rate", "1GB", "--write-rate", "1GB"]) == 2
    assert "--flop-rate 'fast': expected a rate like 300T" in capsys.readouterr().err
    del err
