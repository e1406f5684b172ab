"""What `cachetrain plan --measure` measures beyond the disk (tests/test_disk.py has that): the stage-0
input pipeline through the run's own dataset (torchvision workers and DALI's CPU pipeline), zstd on real
stage outputs (trained weights where the run has them), each stage's seconds, an object store (moto's
S3 server on loopback), the rates file that keeps them, and the plan command's functions that merge
given, measured and assumed figures (cachetrain/plan/command.py) and say what they assumed."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from cachetrain.config import Config, DataConfig
from cachetrain.data import open_dataset
from cachetrain.errors import ConfigError
from cachetrain.plan import command, rates as machine
from cachetrain.plan.compression import INITIALISED, TRAINED, measure_codec
from cachetrain.plan.costs import sample_bytes, with_compression, StageCost
from cachetrain.plan.decode import measure_decode
from tests.conftest import child_pids, cli_in_process, synthetic_raw, write_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """40 training and 20 validation JPEGs (24 px noise) in 4 class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 5)):
        for c in range(4):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


@pytest.mark.parametrize("backend", ["numpy", "dali"])
def test_the_decode_rate_is_measured_through_the_runs_own_pipeline_and_stops_it(jpegs, backend):
    """torchvision workers (numpy) or DALI's CPU-only pipeline, whichever the config picks: both timed, every
    batch after the first counted, and the DataLoader's worker processes gone afterwards."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI (the dali extra) is part of [dev]")
    before = child_pids()
    data = open_dataset(DataConfig(name="imagefolder", root=str(jpegs), image_size=16, val_samples=0), 0, CPU,
                        workers=2, backend=backend)
    assert data.use_dali == (backend == "dali")
    got = measure_decode(data, batch_size=8, seconds=60)  # reads the whole split: 40 images, 5 batches
    assert got.samples == 2 * (40 - 8)  # the first batch of each pass is its start-up, not its rate
    assert all(math.isfinite(r) and r > 0 for r in (got.train_samples_per_s, got.eval_samples_per_s))
    assert got.train_start_seconds > 0 and got.eval_start_seconds > 0
    assert child_pids() <= before  # no worker left behind


def tiny_cfg(tmp_path, **sections) -> Config:
    return Config.from_dict(synthetic_raw(tmp_path / "run", **sections))


def test_zstd_is_measured_on_the_trained_stage_where_there_is_one(tmp_path):
    """The ratio comes from real outputs: through the initialised stages, ReLU maps (some zeros) compress a
    little; through a 'trained' stage 0 that outputs zeros, stage 0's chunks and everything after it compress
    by orders of magnitude, and the figures say which weights they came from."""
    cfg = tiny_cfg(tmp_path)
    data = open_dataset(cfg.data, 0, CPU)
    init = measure_codec(cfg, data, CPU, batch_size=16, batches=2)
    assert init.weights == [INITIALISED] * 3 and init.samples == 32
    assert set(init.ratios) == set(sample_bytes((1, 1, 1)))  # every storage format
    assert all(1.0 < r < 20 for r in init.ratios["float16"])

    class Zeros(torch.nn.Module):
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, x):
            return torch.zeros_like(self.stage(x))

    from cachetrain.models import build_network
    stage0 = build_network(cfg.model, data.sample_shape, cfg.train.seed).stages[0]
    trained = measure_codec(cfg, data, CPU, trained=lambda j: Zeros(stage0) if j == 0 else None, batch_size=16,
                            batches=2)
    assert trained.weights == [TRAINED, INITIALISED, INITIALISED]
    assert trained.ratios["float16"][0] > 50 * init.ratios["float16"][0]
    assert "trained stages 0 and the initialised ones after them" in trained.source()
    assert all(v > 0 for v in trained.decompress_bytes_per_s.values())


def test_the_measured_ratio_sets_the_bytes_a_stage_stores_and_is_read_at():
    """A stage of 8x4x4 outputs: 256 B a sample in fp16, 128 in uint8; at ratios 2 and 4: 128 and 32 B stored."""
    c = StageCost(0, (8, 4, 4), 1.0, 3.0, sample_bytes((8, 4, 4)), 1.0)
    z = with_compression([c], {"float16": [2.0], "uint8": [4.0]})[0]
    assert (z.stored("float16"), z.stored("uint8"), z.stored("float32")) == (128, 32, 512)
    assert z.compressed("uint8") and not z.compressed("float32")


def test_each_stage_seconds_are_measured_per_sample(tmp_path):
    cfg = tiny_cfg(tmp_path)
    got = machine.measure_stage_seconds(cfg, (3, 16, 16), 4, CPU, max_call_seconds=0.05)
    assert len(got) == 3 and all(len(s) == 3 and all(v > 0 and math.isfinite(v) for v in s) for s in got)


def test_measured_rates_round_trip_and_a_file_from_before_them_loads(tmp_path):
    full = machine.MachineRates(1e9, 2e8, 4e8, 5e9, 2**30, decode_samples_per_s=900.0, decode_eval_samples_per_s=1200.0,
                                stage_seconds=[[0.01, 0.004, 0.003]], zstd_ratios={"float16": [2.0]},
                                decompress_bytes_per_s={"float16": 3e8}, compress_bytes_per_s={"float16": 1e8},
                                remote_read_bytes_per_s=7e8, remote_url="s3://b/p", device="cpu (2 cores)")
    machine.save(full, tmp_path)
    assert machine.load(tmp_path) == full
    old = {"flops_per_s": 1e9, "disk_write_bytes_per_s": 2e8, "disk_read_bytes_per_s": 4e8,
           "page_cache_read_bytes_per_s": 5e9, "free_ram_bytes": 2**30}
    (tmp_path / "rates.json").write_text(json.dumps(old))
    assert machine.load(tmp_path).decode_samples_per_s is None
    (tmp_path / "rates.json").write_text(json.dumps({**old, "decode_samples_per_s": -3}))
    with pytest.raises(ConfigError, match="expected positive numbers for decode_samples_per_s"):
        machine.load(tmp_path)
    # to the planner: a CPU shares its cores; decompression runs on the loader's processes
    r = full.to_rates("test", "float16", codec_threads=4)
    assert r.host_shares_compute and r.decompress_bytes_per_s == 1.2e9 and r.decode_samples_per_s == 900.0
    assert r.stage_seconds == ((0.01, 0.004, 0.003),) and not r.remote  # the config's caches are local
    assert full.to_rates("test", remote=True, copies_bytes=10).remote_read_bytes_per_s == 7e8


def test_given_rates_are_parsed_and_merged_over_measured_ones(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"--decode-rate 'fast': expected a rate like 2500 or 2.5K \(images/s\)"):
        command.parse_given(decode_samples_per_s="fast")
    with pytest.raises(ConfigError, match="--compression-ratio '0.5': expected a ratio of raw to stored bytes >= 1"):
        command.parse_given(compression_ratio="0.5")
    decode = command.parse_given(decode_samples_per_s="2.5K")
    assert decode.decode_samples_per_s == 2500
    with pytest.raises(ConfigError, match="--decode-rate counts in a plan in seconds; give --flop-rate"):
        command.seconds_model(cfg, "float16", decode, None)
    machine_given = command.parse_given(flops_per_s="1T", read_bytes_per_s="1GB", write_bytes_per_s="1GB",
                                        decode_samples_per_s="2500")
    r = command.seconds_model(cfg, "float16", machine_given, None)
    assert (r.flops_per_s, r.decode_samples_per_s, r.source) == (1e12, 2500, "given on the command line")
    measured = machine.MachineRates(1e9, 2e8, 4e8, 5e9, 2**30, decode_samples_per_s=900.0,
                                    decode_eval_samples_per_s=1200.0, device="cpu (2 cores)")
    r = command.seconds_model(cfg, "float16", decode, measured)
    assert (r.flops_per_s, r.decode_samples_per_s, r.decode_eval_samples_per_s) == (1e9, 2500, None)
    with pytest.raises(ConfigError, match="--remote-read-rate: cache.location '' is not an object store"):
        command.seconds_model(cfg, "float16", command.parse_given(remote_read_bytes_per_s="1GB"), measured)
    remote = tiny_cfg(tmp_path, cache={"location": "s3://bucket/caches", "remote_copies": str(tmp_path / "copies"),
                                       "remote_copies_gib": 1})
    r = command.seconds_model(remote, "float16", command.parse_given(remote_read_bytes_per_s="1GB"), measured)
    assert r.remote and r.remote_read_bytes_per_s == 1e9 and r.copies_bytes == 2**30


def test_the_plan_says_what_it_assumed(tmp_path, jpegs):
    """An image folder planned in seconds without a decode rate says decoding is assumed to keep up; with
    one, it says nothing of the kind. zstd without a ratio says the caches are counted raw."""
    folder = tiny_cfg(tmp_path, data={"name": "imagefolder", "root": str(jpegs), "image_size": 16})
    given = command.parse_given(flops_per_s="1T", read_bytes_per_s="1GB", write_bytes_per_s="1GB")
    data = open_dataset(folder.data, 0, CPU)
    w, classes = command.workload(folder, data)
    assert (w.train, w.test, w.train_eval, classes) == (37, 20 + 3, 3, 4)  # 3 of 40 held out for validation
    costs, notes = command.plan_costs(folder, (3, 16, 16), classes, "float16", given, None)
    assert notes == ["zstd's ratio was neither measured (--measure with the dataset) nor given (--compression-ratio): "
                     "caches are counted and read at their raw size"]
    plain = command.make_plan(folder, costs, w, 2**40, "float16", command.seconds_model(folder, "float16", given, None))
    assert any("decoding the images is assumed to keep up" in n for n in plain["notes"])
    with_rate = command.make_plan(folder, costs, w, 2**40, "float16", command.seconds_model(
        folder, "float16", command.parse_given(flops_per_s="1T", read_bytes_per_s="1GB", write_bytes_per_s="1GB",
                                               decode_samples_per_s="100"), None))
    assert not any("decod" in n for n in with_rate["notes"]) and with_rate["rates"]["decode_samples_per_s"] == 100
    costs, notes = command.plan_costs(folder, (3, 16, 16), classes, "float16", command.Given(compression_ratio=2.0),
                                      None)
    assert costs[0].stored("float16") == costs[0].sample_bytes["float16"] / 2 and "given for every stage" in notes[0]


def test_a_remote_cache_without_its_rates_is_said_to_be_planned_as_local(tmp_path):
    remote = tiny_cfg(tmp_path, cache={"location": "s3://bucket/caches"})
    measured = machine.MachineRates(1e9, 2e8, 4e8, 5e9, 2**30, device="cpu (2 cores)")  # no object store measured
    model = command.seconds_model(remote, "float16", command.Given(), measured)
    costs = [StageCost(j, (1, 1, 1), 1.0, 3.0, {"float16": 2}, 1.0) for j in range(2)]
    got = command.make_plan(remote, costs, command.workload_of(remote, 10, 5), 2**40, "float16", model)
    assert any("is an object store, but its rates were neither measured" in n for n in got["notes"])
    given = command.seconds_model(remote, "float16", command.parse_given(remote_read_bytes_per_s="1GB"), measured)
    got = command.make_plan(remote, costs, command.workload_of(remote, 10, 5), 2**40, "float16", given)
    assert not any("object store" in n for n in got["notes"]) and got["stages"][0]["tier"] == "the object store"


def test_plan_command_prints_break_even_rates_and_the_decode_assumption(tmp_path, jpegs):
    """The command line end to end (the decode rate and the break-even column); an image folder planned in
    seconds without a decode rate says it assumes decoding keeps up."""
    raw = synthetic_raw(tmp_path / "run", data={"name": "imagefolder", "root": str(jpegs), "image_size": 16})
    config = write_config(tmp_path / "c.yaml", raw)
    rates = ["--flop-rate", "1G", "--read-rate", "100MB", "--write-rate", "50MB"]
    out = cli_in_process(["plan", "--config", str(config), *rates]).stdout
    assert "decoding the images is assumed to keep up" in out and "break-even" in out
    free = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][0]
    done = cli_in_process(["plan", "--config", str(config), *rates, "--decode-rate", "50"])
    assert done.returncode == 0 and "assumed to keep up" not in done.stdout
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["rates"]["decode_samples_per_s"] == 50
    # 50 images/s is 20 ms a sample to recompute stage 1's input, against 4 KiB to read: caching stage 0 pays
    # from a few hundred KB/s, far below what the disk gives, and far below where it paid with free decoding
    slow = saved["stages"][0]
    assert slow["cached"] and not slow["never_pays"] and 0 < slow["break_even_read_bytes_per_s"] < 1e6
    assert free["never_pays"] or free["break_even_read_bytes_per_s"] > 10 * slow["break_even_read_bytes_per_s"]
    bad = cli_in_process(["plan", "--config", str(config), "--decode-rate", "50"])
    assert bad.returncode == 2 and "--decode-rate counts in a plan in seconds" in bad.stderr


@pytest.fixture(scope="module")
def bucket():
    """moto's S3 server on 127.0.0.1 (as tests/test_s3.py starts it), one bucket, the AWS_* environment set."""
    pytest.importorskip("s3fs", reason="the s3 extra is part of [dev]")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is part of [dev]")
    from cachetrain.cache.location import RemotePath, _filesystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.get_host_and_port()[1]}", "AWS_MAX_ATTEMPTS": "2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _filesystem.cache_clear()
    RemotePath("s3://plan-test").fs.mkdir("plan-test")
    yield RemotePath("s3://plan-test/caches")
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    _filesystem.cache_clear()


def test_the_object_store_is_measured_and_left_as_it_was(bucket):
    from cachetrain.plan.tiers import measure_object_store

    got = measure_object_store(bucket, nbytes=2 * 2**20, object_bytes=2**19)
    assert all(math.isfinite(v) and v > 0 for v in got.values()) and set(got) == {"read", "write"}
    assert not bucket.exists()  # the probe objects are gone


def test_plan_measure_reaches_the_object_store_at_cache_location(tmp_path, bucket, monkeypatch):
    """With cache.location on an object store, --measure measures it (and the local copies' disk), and the plan
    reads its caches from there: the first epoch from the bucket, the rest from the copies."""
    calls = []
    monkeypatch.setattr(machine, "measure_disk", lambda folder, *a, **k: calls.append(str(folder)) or
                        {"write": 3e8, "read": 6e8, "page_cache": 5e9})
    cfg = tiny_cfg(tmp_path, cache={"location": str(bucket), "remote_copies": str(tmp_path / "copies")})
    data = open_dataset(cfg.data, 0, CPU)
    got = command.measure_rates(cfg, data, tmp_path / "run", CPU, probe_seconds=0.1)
    assert calls == [str(tmp_path / "copies")] and got.remote_url == str(bucket)
    assert got.remote_read_bytes_per_s > 0 and got.zstd_ratios and got.stage_seconds and got.decode_samples_per_s
    model = command.seconds_model(cfg, "float16", command.Given(), got)
    assert model.remote and model.copies_bytes == int(cfg.cache.remote_copies_gib * 2**30)
    w, classes = command.workload(cfg, data)
    costs, _ = command.plan_costs(cfg, (3, 16, 16), classes, "float16", command.Given(), got)
    result = command.make_plan(cfg, costs, w, 2**40, "float16", model)
    assert result["stages"][0]["tier"] == "the object store, then copies on the page cache"
    assert result["stages"][0]["tier_first_read_bytes_per_s"] == pytest.approx(got.remote_read_bytes_per_s)



@pytest.mark.slow
def test_plan_check_predicts_and_measures_whole_runs(tmp_path):
    """benchmarks/plan_check.py --quick on the JPEG regime (J=2, cached and recompute) and the cold one: every
    stage predicted and timed, the totals' ratio reported; the figures at toy sizes mean nothing."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_check.py"
    got = runpy.run_path(str(script), run_name="benchmark")["main"](
        ["--quick", "--regimes", "jpeg", "cold", "--out", str(tmp_path / "out")])
    arms = {(r["regime"], arm): a for r in got["results"] for arm, a in r["arms"].items()}
    assert set(arms) == {("jpeg", "cached"), ("jpeg", "recompute"), ("cold", "cached")}
    for a in arms.values():
        assert len(a["stages"]) == 2 and a["measured_s"] > 0 and a["predicted_s"] > 0
        assert all(s["measured_train_s"] > 0 for s in a["stages"])
    assert arms[("jpeg", "cached")]["stages"][0]["measured_cache_s"] > 0  # stage 0 cached, then read
    assert arms[("jpeg", "cached")]["rates"]["decode_samples_per_s"] > 0  # the JPEG pipeline was measured
    assert arms[("cold", "cached")]["stages"][1]["input"] == "cache 0"
    assert (tmp_path / "out" / "results.md").read_text().count("| jpeg |") == 4 + 2  # 4 stage rows (2 arms x 2 stages), 2 totals


def test_each_given_object_store_rate_replaces_only_its_measured_one(tmp_path):
    """--remote-read-rate alone keeps the measured PUT rate (it once reset it, and caching passes were then
    counted at the local disk's write rate); --remote-write-rate alone keeps the measured GET rate; either
    on a local cache is refused in one line."""
    remote = tiny_cfg(tmp_path, cache={"location": "s3://bucket/caches"})
    measured = machine.MachineRates(1e9, 2e8, 4e8, 5e9, 2**30, device="cpu (2 cores)",
                                    remote_read_bytes_per_s=3e8, remote_write_bytes_per_s=1e8)
    read = command.seconds_model(remote, "float16", command.parse_given(remote_read_bytes_per_s="1GB"), measured)
    assert (read.remote_read_bytes_per_s, read.write_rate()) == (1e9, 1e8)
    write = command.seconds_model(remote, "float16", command.parse_given(remote_write_bytes_per_s="50MB"), measured)
    assert (write.remote_read_bytes_per_s, write.write_rate()) == (3e8, 5e7)
    local = tiny_cfg(tmp_path / "local")
    with pytest.raises(ConfigError, match=r"--remote-write-rate: cache.location .* is not an object store"):
        command.seconds_model(local, "float16", command.parse_given(remote_write_bytes_per_s="50MB"), measured)
