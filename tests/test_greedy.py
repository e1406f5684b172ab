"""The greedy loop end to end: real Fashion-MNIST subset, cache between stages, eval from raw images."""

from __future__ import annotations

import json

import pytest
import torch

from cachetrain.cache import CacheReader, CacheState
from cachetrain.cli import main
from cachetrain.config import Config
from cachetrain.models import build_network
from cachetrain.run import StageState
from tests.conftest import greedy_of, fmnist_raw, load, tiny_greedy, tiny_run, write_config


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    """3 stages on 2,000 training / 1,000 test images of the real Fashion-MNIST, trained once for the module."""
    d = tmp_path_factory.mktemp("fmnist")
    raw = fmnist_raw(d / "run")
    raw["train"]["probes"] = False  # the probes have tests of their own; here they would add ~15 s
    path = write_config(d / "fmnist-subset.yaml", raw)
    assert main(["train", "--config", str(path)]) == 0
    return path, Config.from_dict(raw)


def test_train_reaches_well_above_chance_and_caches_each_stage(fmnist_run):
    _, cfg = fmnist_run
    g = greedy_of(cfg)
    rows = g.state.status()
    assert [r.state for r in rows] == [StageState.TRAINED] * 3
    assert [r.cache for r in rows] == [CacheState.COMPLETE, CacheState.COMPLETE, None]
    assert rows[-1].test_acc >= 0.70, rows[-1].test_acc
    assert all(r.cache_bytes > 0 and r.raw_bytes / r.cache_bytes > 1.0 for r in rows[:2])  # zstd did compress
    lines = (cfg.run_path / "stages" / "stage_2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    assert (cfg.run_path / "config.yaml").exists()


def test_eval_from_raw_images_agrees_with_cached_path(fmnist_run):
    _, cfg = fmnist_run
    result = greedy_of(cfg).evaluate_network()
    assert result["stages"] == 3 and result["test_acc"] >= 0.70
    assert result["agreement"] >= 0.995, result


def test_cached_features_equal_a_fresh_forward_within_fp16_rounding(fmnist_run):
    _, cfg = fmnist_run
    g = greedy_of(cfg)
    for j in (0, 1):
        reader = CacheReader(g.run.layout.store(j, "test"), g.state.output_fingerprint(j))
        cached = torch.cat([reader.read_chunk(c) for c in range(reader.info.num_chunks)]).float()
        inputs = g.inputs.input_source(j).eval_batches("test", 100)
        with torch.no_grad():
            fresh = torch.cat([g.inputs.trained_stage(j)(x) for x, _ in inputs])
        assert cached.shape == fresh.shape
        # fp16 keeps 11 significant bits: relative error at most 2**-11, plus subnormal slack near zero
        torch.testing.assert_close(cached, fresh, rtol=2**-10, atol=1e-4)


def test_stage_k3_trains_next_stage_from_cache_without_running_stage_0(tmp_path):
    """Seen through torch's global forward hook: while stage 1 trains and caches, no module is ever fed a
    batch of raw images (3x16x16), only stage 0's cached output (8x16x16). (Building the network probes each
    stage's output shape with one zero image: batches of one sample are not data.)"""
    path, cfg = tiny_run(tmp_path)
    assert main(["stage", "--config", str(path)]) == 0  # stage 0, then its cache
    seen = {"images": 0, "stage0_output": 0}

    def count(module, args, output):
        batch = args[0] if args and isinstance(args[0], torch.Tensor) else None
        shape = tuple(batch.shape[1:]) if batch is not None and len(batch) > 1 else None
        seen["images"] += shape == (3, 16, 16)
        seen["stage0_output"] += shape == (8, 16, 16)

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        assert main(["stage", "--config", str(path), "--k", "3"]) == 0
    finally:
        hook.remove()
    assert seen["images"] == 0 and seen["stage0_output"] > 0
    g = greedy_of(cfg)
    assert g.state.checkpoint(1).k == 3 and g.state.stage_state(1) is StageState.TRAINED
    assert g.state.status()[1].cache is CacheState.COMPLETE


def test_stage_j_without_its_input_cache_names_the_command(tmp_path, capsys):
    path, _ = tiny_run(tmp_path)
    assert main(["stage", "--config", str(path), "--no-cache"]) == 0
    assert main(["stage", "--config", str(path), "--j", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"run: cachetrain cache --config {path} --j 0" in err
    assert main(["stage", "--config", str(path), "--j", "2"]) == 2
    assert f"stage 2 needs stage 1 trained first (untrained); run: cachetrain stage --config {path} --j 1" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_retraining_a_stage_marks_later_stages_and_caches_stale(tmp_path):
    path, cfg = tiny_run(tmp_path)
    assert main(["train", "--config", str(path)]) == 0
    assert [r.state for r in greedy_of(cfg).state.status()] == [StageState.TRAINED] * 3
    # another learning rate (the same one would retrain bit-identical weights), accepted from stage 0
    lr = ["--set", "train.lr=0.01"]
    assert main(["stage", "--config", str(path), "--j", "0", "--no-cache", *lr, "--from-stage", "0"]) == 0
    cfg = load(path, *lr[1:])
    rows = greedy_of(cfg).state.status()
    assert [r.state for r in rows] == [StageState.TRAINED, StageState.STALE, StageState.STALE]
    assert rows[0].cache is CacheState.STALE and rows[1].cache is CacheState.STALE
    assert main(["train", "--config", str(path), *lr]) == 0  # rebuilds cache 0, retrains 1 and 2
    assert [r.state for r in greedy_of(cfg).state.status()] == [StageState.TRAINED] * 3


def test_cpu_training_is_deterministic_for_a_seed(tmp_path):
    """Two runs of one config train bit-identical weights, which training moved away from their seeded
    initial values (equal weights would prove nothing if nothing were trained)."""
    weights = []
    for name in ("a", "b"):
        g = tiny_greedy(tmp_path / name)
        g.train_all()
        weights.append([g.state.checkpoint(j).model for j in range(3)])
    init = build_network(g.cfg.model, (3, 16, 16), g.cfg.train.seed)
    for j, (a, b) in enumerate(zip(*weights)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        params = dict(init.stages[j].named_parameters())  # not buffers: BatchNorm statistics move without a step
        assert params and any(not torch.equal(a[k], p) for k, p in params.items()), f"stage {j} untrained"


@pytest.mark.parametrize("arch, stages", [("vgg", 3), ("resnet", 3)])
def test_other_architectures_train_greedily(tmp_path, arch, stages):
    g = tiny_greedy(tmp_path / "run", model={"arch": arch, "stages": stages, "width": 8, "downsample": []})
    rows = g.train_all()
    assert [r.state for r in rows] == [StageState.TRAINED] * stages
    assert rows[-1].test_acc > 1 / 4  # above chance on 4 classes


def test_missing_fmnist_names_the_install_command(tmp_path, monkeypatch, capsys):
    import cachetrain.data.tensors as data

    monkeypatch.setattr(data, "DEBIAN_FMNIST", tmp_path / "nowhere")
    raw = fmnist_raw(tmp_path / "run")
    raw["data"]["root"] = str(tmp_path / "empty")
    path = write_config(tmp_path / "f.yaml", raw)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install -y dataset-fashion-mnist" in err


def test_status_prints_table_without_touching_the_run(tmp_path, capsys):
    path, _ = tiny_run(tmp_path)
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("untrained") == 3  # one row per stage
    assert not (tmp_path / "run").exists()  # nothing written: no stages, no config.yaml
