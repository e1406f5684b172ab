"""A run's TensorBoard curves (cachetrain.run.events): read back through a real `tensorboard` server equal to
the run's records, continued by a resumed run without a duplicated or a missing step, and a run that trains
on, saying so once, without the tensorboard package."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import cli, cli_in_process, synthetic_raw, write_config

SMALL = {"synthetic_train": 192, "val_samples": 32, "synthetic_test": 64}  # 160 training samples: 5 steps of 32
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "gap", "lr", "samples_per_s")


def f32(x: float) -> float:
    """A number as an event file holds it (a float32 scalar)."""
    return float(np.float32(x))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def event_scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of `tb`, as TensorBoard's own reader loads them: (step, value)
    in the order read."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- a finished run, read through a tensorboard server ----------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """runs/tiny: two greedy stages (2 epochs of 5 steps each, probes on, stage 0 cached) and the end-to-end
    network."""
    root = tmp_path_factory.mktemp("tb")
    run = root / "runs" / "tiny"
    raw = synthetic_raw(run, model={"stages": 2}, data=SMALL, train={"epochs": 2, "probes": True})
    config = write_config(root / "tiny.yaml", raw)
    for command in ("train", "e2e"):
        done = cli_in_process([command, "--config", str(config)])
        assert done.returncode == 0, done.stdout + done.stderr
        if command == "train":  # it ends with the command that opens the curves of every run beside it
            assert f"curves: tensorboard --logdir {root / 'runs'} " in done.stdout
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tensorboard --logdir LOGDIR` on loopback, read through its HTTP data API."""

    def __init__(self, logdir: Path, load_fast: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), f"--load_fast={load_fast}", "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(self, route: str, **query):
        url = f"http://127.0.0.1:{self.port}/data/{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    def post(self, route: str, body: dict):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/data/{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def tags(self, run: str, expected: set[str], timeout: float = 90) -> set[str]:
        """The run's scalar tags once the server has loaded `expected` (it loads in the background)."""
        deadline = time.monotonic() + timeout
        found: set[str] = set()
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tensorboard exited: {self.proc.stderr.read()[-2000:]}"
            try:
                found = set(self.get("plugin/scalars/tags").get(run, {}))
            except OSError:
                pass  # not listening yet
            if expected <= found:
                return found
            time.sleep(0.5)
        raise AssertionError(f"tensorboard did not load {sorted(expected - found)} in {timeout} s")

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        return [(step, value) for _, step, value in self.get("plugin/scalars/scalars", run=run, tag=tag)]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("load_fast", ["true", "false"])  # its data server (the default), and its Python reader
def test_a_tensorboard_server_serves_the_runs_curves_equal_to_its_records(finished_run, load_fast):
    run, name = finished_run, "tiny/tb"
    units = {"stage_0": run / "stages/stage_0", "stage_1": run / "stages/stage_1", "e2e": run / "e2e"}
    rows = {label: jsonl(folder / "metrics.jsonl") for label, folder in units.items()}
    probes = jsonl(run / "probes.jsonl")
    expected = {f"{key}/{label}" for label in units for key in EPOCH_KEYS} | \
        {f"{key}_step/{label}" for label in units for key in ("train_loss", "train_acc", "lr")} | \
        {"by_stage/test_acc", "by_stage/e2e_test_acc", "by_stage/probe_gap_test_acc",
         "by_stage/e2e_probe_gap_test_acc", "cache/written_mb", "cache/disk_mb", "cache/write_mb_per_s"}
    server = Server(run.parent, load_fast)  # `tensorboard --logdir runs/`: every run under it, by name
    try:
        assert server.tags(name, expected) >= expected
        assert name in server.get("runs")
        for label, unit_rows in rows.items():
            # x = the unit's step: epoch e ends at e * steps per epoch
            steps = server.scalars(name, f"train_loss/{label}")[0][0] // unit_rows[0]["epoch"]
            for key in EPOCH_KEYS:
                assert server.scalars(name, f"{key}/{label}") == [(r["epoch"] * steps, f32(r[key])) for r in unit_rows]
            wait = server.scalars(name, f"data_wait/{label}")
            assert wait == [(r["epoch"] * steps, f32(r["data_seconds"] / r["train_seconds"])) for r in unit_rows]
            # a step row at every step here (5 steps an epoch: ~1% of it is one), whose running mean at the
            # epoch's last step is the epoch's train_loss
            step_loss = dict(server.scalars(name, f"train_loss_step/{label}"))
            assert sorted(step_loss) == list(range(1, len(unit_rows) * steps + 1))
            assert [step_loss[r["epoch"] * steps] for r in unit_rows] == [f32(r["train_loss"]) for r in unit_rows]
            assert dict(server.scalars(name, f"lr_step/{label}"))[steps * len(unit_rows)] == f32(unit_rows[-1]["lr"])
        # the by-stage view: x = stage j
        assert server.scalars(name, "by_stage/test_acc") == [(0, f32(rows["stage_0"][-1]["test_acc"])),
                                                             (1, f32(rows["stage_1"][-1]["test_acc"]))]
        assert server.scalars(name, "by_stage/gap") == [(0, f32(rows["stage_0"][-1]["gap"])),
                                                        (1, f32(rows["stage_1"][-1]["gap"]))]
        assert server.scalars(name, "by_stage/e2e_test_acc") == [(1, f32(rows["e2e"][-1]["test_acc"]))]
        for net, prefix in (("greedy", "by_stage/probe_gap"), ("e2e", "by_stage/e2e_probe_gap")):
            want = [(r["stage"], f32(r["test_acc"])) for r in probes if r["net"] == net and r["pool"] == "gap"]
            assert server.scalars(name, f"{prefix}_test_acc") == want
        # stage 0's caching pass (stage 1, the last, has no cache): its outputs' bytes, and the files on disk
        cache = run / "cache" / "stage_0"
        produced = sum(zarr.open_array(store / "features", mode="r").nbytes for store in cache.glob("*.zarr"))
        on_disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        assert server.scalars(name, "cache/written_mb") == [(0, f32(produced / 1e6))]
        assert server.scalars(name, "cache/disk_mb") == [(0, f32(on_disk / 1e6))]
        assert server.scalars(name, "cache/write_mb_per_s")[0][1] > 0
        # the config, as text and as hparams
        text = server.get("plugin/text/text", run=name, tag="config")
        assert "name: tiny" in text[0]["text"] and "lr: 0.05" in text[0]["text"]
        experiment = server.post("plugin/hparams/experiment", {"experimentName": ""})
        assert {"train.lr", "model.stages", "cache.dtype"} <= {h["name"] for h in experiment["hparamInfos"]}
        assert "by_stage/test_acc" in {m["name"]["tag"] for m in experiment["metricInfos"]}
    finally:
        server.stop()


# -- a killed run, resumed --------------------------------------------------------------------------------

def stage_config(path: Path, run: Path) -> Path:
    """One stage, 2 epochs of 5 steps, a checkpoint every 2 steps (and at each epoch's end), no probes."""
    return write_config(path, synthetic_raw(run, model={"stages": 1, "downsample": []}, data=SMALL,
                                            train={"epochs": 2, "checkpoint_steps": 2, "probes": False}))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, list[tuple[int, float]]]:
    root = tmp_path_factory.mktemp("whole")
    done = cli_in_process(["train", "--config", str(stage_config(root / "c.yaml", root / "run"))])
    assert done.returncode == 0, done.stdout + done.stderr
    return event_scalars(root / "run" / "tb")


@pytest.mark.parametrize("fault, checkpointed, written", [
    ("train_step:5", "1, batch 4", 4),  # killed after step 5: its checkpoint at step 4, its events up to there
    # killed writing the checkpoint of epoch 2's step 4 (the 5th: steps 2 and 4, the end of epoch 1, epoch 2's
    # step 2): events up to unit step 9 on disk, resumes at step 2 of epoch 2 (unit step 7)
    pytest.param("checkpoint_write:5", "2, batch 2", 9, marks=pytest.mark.slow),
])
def test_a_killed_run_resumed_continues_its_curves_without_a_duplicated_or_missing_step(
        tmp_path, uninterrupted, fault, checkpointed, written):
    config = stage_config(tmp_path / "c.yaml", tmp_path / "run")
    tb = tmp_path / "run" / "tb"
    killed = cli(["train", "--config", str(config)], fault=fault)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert max(step for step, _ in event_scalars(tb)["train_loss_step/stage_0"]) == written
    resumed = cli(["train", "--config", str(config)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at epoch {checkpointed}/5" in resumed.stdout

    curves = event_scalars(tb)
    assert set(curves) == set(uninterrupted)
    for tag, points in curves.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: steps out of order or twice: {steps}"
        assert steps == [step for step, _ in uninterrupted[tag]], f"{tag}: steps differ from an uninterrupted run"
        if not tag.startswith(("samples_per_s", "data_wait", "cache/")):  # timings differ, the training does not
            assert points == uninterrupted[tag], tag
    unit_files = sorted(p.name for p in tb.iterdir() if p.name.endswith(".stage_0"))
    assert len(unit_files) == 1, unit_files  # the killed process's file was replaced, not left beside


# -- no tensorboard ---------------------------------------------------------------------------------------

def test_without_tensorboard_a_run_says_so_once_and_trains_on(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboard...` raises ImportError
    with pytest.raises(ImportError):
        import tensorboard.compat.proto.event_pb2  # noqa: F401
    raw = synthetic_raw(tmp_path / "run", model={"stages": 2}, data=SMALL, train={"epochs": 1, "probes": False})
    done = cli_in_process(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))])
    assert done.returncode == 0, done.stdout + done.stderr
    said = [line for line in done.stdout.splitlines() if "not installed" in line]
    assert len(said) == 1 and said[0].startswith("tensorboard is not installed"), done.stdout  # 2 stages, a cache
    assert all((tmp_path / "run" / "stages" / f"stage_{j}" / "checkpoint.pt").exists() for j in range(2))
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))


# -- the benchmark, at toy size ---------------------------------------------------------------------------

@pytest.mark.slow
def test_tb_bench_times_an_epoch_with_and_without_events(tmp_path):
    import runpy

    raw = synthetic_raw(tmp_path / "unused", model={"stages": 1, "downsample": []}, data=SMALL)
    config = write_config(tmp_path / "c.yaml", raw)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "tb_bench.py"
    out = tmp_path / "out"
    summary = runpy.run_path(str(script), run_name="benchmark")["main"](
        ["--config", str(config), "--rounds", "2", "--train-subset", "0", "--out", str(out)])
    assert [r["first"] for r in summary["rounds"]] == ["on", "off"]  # the order alternates
    for r in summary["rounds"]:
        # 5 step rows, an epoch row, the flush before the epoch's checkpoint, closing, the by-stage summary
        assert r["event_calls"] == 9 and r["event_bytes"] > 0 and r["events_s"] > 0
        assert r["epoch_on_s"] > 0 and r["epoch_off_s"] > 0
    assert json.loads((out / "results.json").read_text())["median"] == summary["median"]
    assert "% of the epoch" in (out / "results.md").read_text()
