"""Trust the run directory: durable small files, checkpoints that are data (never code), checkpoints
that do not fit the model, e2e resumed bit for bit, and read-only run directories or data roots.

Crashes are real SIGKILLs of real processes (CACHETRAIN_FAULT, or a child that kills itself mid-write);
the read-only cases are simulated in-process (see `read_only`) because the tests run as root, for whom
chmod does not stop a write, plus a real read-only tmpfs where this machine lets us mount one.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zarr

from cachetrain import durable
from cachetrain.cache import CacheState, store_state
from cachetrain.cache import writer
from cachetrain.errors import CheckpointError
from cachetrain.run.checkpoint import Checkpoint, Checkpoints
from cachetrain.cli import main
from cachetrain.config import Config
from cachetrain.run import RunLayout
from cachetrain.run.records import Records
from tests.conftest import greedy_of, cli, fmnist_raw, make_store, synthetic_raw, write_config

REPO = Path(__file__).resolve().parent.parent


# -- the atomic write ---------------------------------------------------------------------------------
def child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_writer_killed_mid_write_or_before_the_rename_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "state.bin"
    old, new = b"O" * 3_000_000, b"N" * 3_000_000
    path.write_bytes(old)
    killed_mid_write = child("""
        import os, signal, sys
        from cachetrain.durable import atomic_write
        def half(f):
            f.write(b"N" * 1_500_000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(sys.argv[1], half)
    """, str(path))
    assert killed_mid_write.returncode == -signal.SIGKILL, killed_mid_write.stderr
    assert path.read_bytes() == old
    killed_before_rename = child("""
        import os, signal, sys
        from cachetrain.durable import atomic_write
        atomic_write(sys.argv[1], b"N" * 3_000_000, before_replace=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
    """, str(path))
    assert killed_before_rename.returncode == -signal.SIGKILL, killed_before_rename.stderr
    assert path.read_bytes() == old  # the new bytes are complete in the temp file, but never named `path`
    durable.atomic_write(path, new)  # the next write replaces the leftover temp file and the old one
    assert path.read_bytes() == new and sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")

    def no_rename(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))

    monkeypatch.setattr(durable.os, "replace", no_rename)
    with pytest.raises(OSError):
        durable.atomic_write(path, "new: 2\n")
    assert path.read_text() == "old: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def _record_syncs(monkeypatch) -> list[tuple]:
    """Spy on fsync and rename: ("fsync", path of the fd) and ("replace", src, dst), in order."""
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    return events


def test_the_data_is_on_disk_before_the_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    """What survives a power cut: the temp file's bytes are fsynced before it takes the name, and the folder
    after (else the rename itself can be lost); a folder the write created is fsynced into its parent."""
    events = _record_syncs(monkeypatch)
    path = tmp_path / "new" / "plan.json"
    durable.write_json(path, {"cached": [0]})
    tmp = str(path) + ".tmp"
    assert ("fsync", str(tmp_path)) in events  # the new folder's entry
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp, str(path))) < \
        events.index(("fsync", str(path.parent)))


def test_checkpoints_config_and_metrics_are_written_durably(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", model={"stages": 1, "downsample": []}))
    assert main(["train", "--config", str(path)]) == 0
    stage = tmp_path / "run" / "stages" / "stage_0"
    synced = {e[1] for e in events if e[0] == "fsync"}
    assert {str(stage / "checkpoint.pt.tmp"), str(stage), str(stage / "metrics.jsonl"),
            str(tmp_path / "run" / "config.yaml.tmp"), str(tmp_path / "run")} <= synced
    assert ("replace", str(stage / "checkpoint.pt.tmp"), str(stage / "checkpoint.pt")) in events


def test_a_metrics_line_torn_by_a_crash_costs_only_itself(tmp_path):
    run = Records(RunLayout.of(tmp_path))
    run.append_metrics(0, {"epoch": 1, "test_acc": 0.5})
    with open(run.layout.metrics(0), "a") as f:
        f.write('{"epoch": 2, "test_a')  # a crash mid-append
    assert [r["epoch"] for r in run.read_metrics(0)] == [1]
    run.append_metrics(0, {"epoch": 2, "test_acc": 0.6})  # the epoch, trained again after the resume
    assert [r["epoch"] for r in run.read_metrics(0)] == [1, 2]
    run.truncate_metrics(0, 1)
    assert run.layout.metrics(0).read_text() == '{"epoch": 1, "test_acc": 0.5}\n'


# -- the caching pass: every chunk durable before `complete`, though fsynced all together at the end ----------
def _record_cache_syncs(monkeypatch) -> list:
    """The path of every fsync the caching pass makes (from any thread), and "complete" where it writes the
    flag (the attribute update that sets it, before that file is itself fsynced)."""
    events: list = []
    monkeypatch.setattr(writer, "fsync_path", lambda p: events.append(Path(p)) or durable.fsync_path(p))
    update = zarr.Group.update_attributes

    def flagging(group, new):
        if new.get("complete"):
            events.append("complete")
        return update(group, new)

    monkeypatch.setattr(zarr.Group, "update_attributes", flagging)
    return events


def test_a_caching_pass_fsyncs_every_chunk_before_it_writes_the_complete_flag(tmp_path, monkeypatch):
    """The chunk files are fsynced together after the last is written, on several threads: still every
    chunk file, the labels, the metadata, the checksum manifest and every folder naming them is on disk
    before the flag is written, each file before the folder naming it."""
    events = _record_cache_syncs(monkeypatch)
    path = tmp_path.resolve() / "train.zarr"
    reader = make_store(path, codec="none")
    flag = events.index("complete")
    assert {p for p in path.rglob("*") if p != path / "zarr.json"} | {path, path.parent} <= set(events[:flag])
    chunks = [Path(reader.chunk_path(c)) for c in range(reader.info.num_chunks)]
    assert len(chunks) == 10 and all(events.index(c) < events.index(c.parent) for c in chunks)
    assert events[flag:] == ["complete", path / "zarr.json", path]  # then the flag itself


def test_a_caching_pass_killed_midway_resumes_and_syncs_what_the_killed_pass_left(tmp_path, monkeypatch):
    """A real SIGKILL after 4 chunks: those were never fsynced. The rerun computes only the rest, fsyncs the
    killed pass's chunks too before the flag, and the store reads back exactly."""
    path = tmp_path.resolve() / "train.zarr"
    monkeypatch.setenv("CACHETRAIN_FAULT", "cache_chunk:4")
    killed = child("import sys; from pathlib import Path; from tests.conftest import make_store; "
                   "make_store(Path(sys.argv[1]), codec='none')", str(path))
    monkeypatch.delenv("CACHETRAIN_FAULT")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = {p: p.stat().st_mtime_ns for p in (path / "features" / "c").rglob("*") if p.is_file()}
    assert len(left) == 4 and store_state(path, "fp")[0] is CacheState.WRITING
    events = _record_cache_syncs(monkeypatch)
    reader = make_store(path, codec="none")
    assert set(left) <= set(events[:events.index("complete")])
    assert {p: p.stat().st_mtime_ns for p in left} == left  # kept, not rewritten
    got = torch.cat([reader.read_chunk(c) for c in range(reader.info.num_chunks)])
    assert torch.equal(got[:, 0, 0, 0], torch.arange(len(got), dtype=got.dtype))


def test_a_disk_error_at_the_final_fsync_leaves_the_store_unfinished_and_names_the_file(tmp_path, monkeypatch):
    """An fsync that fails on one of the parallel threads reaches the caller naming the chunk file, and the
    store is not marked complete; the rerun completes it without rewriting a chunk."""
    path = tmp_path.resolve() / "train.zarr"
    bad = path / "features" / "c" / "3" / "0" / "0" / "0"

    def failing(p):
        if Path(p) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # as os.fsync raises it: no file name
        durable.fsync_path(p)

    monkeypatch.setattr(writer, "fsync_path", failing)
    with pytest.raises(OSError) as raised:
        make_store(path, codec="none")
    assert raised.value.errno == errno.EIO and raised.value.filename == str(bad)
    assert store_state(path, "fp")[0] is CacheState.WRITING
    written = {p: p.stat().st_mtime_ns for p in (path / "features" / "c").rglob("*") if p.is_file()}
    assert len(written) == 10
    monkeypatch.setattr(writer, "fsync_path", durable.fsync_path)  # the disk recovered
    make_store(path, codec="none")
    assert store_state(path, "fp")[0] is CacheState.COMPLETE
    assert {p: p.stat().st_mtime_ns for p in written} == written


# -- e2e resumes bit for bit ----------------------------------------------------------------------------
E2E_KILLS = ["train_step:5", "train_step:14"]  # 12 steps an epoch, a checkpoint every 3: epoch 1 then epoch 2


def e2e_raw(run_dir: Path) -> dict:
    return synthetic_raw(run_dir, train={"epochs": 1, "e2e_epochs": 2, "checkpoint_steps": 3})


def e2e_state(run_dir: Path) -> dict[str, bytes]:
    ck = torch.load(run_dir / "e2e" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == ck["epochs"] == 2
    state = {f"model.{k}": v.numpy().tobytes() for k, v in ck["model"].items()}
    for i, s in ck["optimizer"]["state"].items():
        state.update({f"optimizer.{i}.{k}": v.numpy().tobytes() for k, v in s.items() if torch.is_tensor(v)})
    return {**state, "test_acc": repr(ck["test_acc"]).encode()}


@pytest.mark.slow
def test_e2e_killed_mid_epoch_resumes_bit_identically(tmp_path):
    # the uninterrupted reference in this process (a run's results may not depend on which process made them);
    # every killed run and the resumed one are real processes
    ref = write_config(tmp_path / "ref.yaml", e2e_raw(tmp_path / "ref"))
    assert main(["e2e", "--config", str(ref)]) == 0
    path = write_config(tmp_path / "c.yaml", e2e_raw(tmp_path / "run"))
    for fault in E2E_KILLS:
        proc = cli(["e2e", "--config", str(path)], fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
    ck = torch.load(tmp_path / "run" / "e2e" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["batch"]) == (1, 3) and set(ck["rng"]) == {"torch"}  # mid-epoch 2
    proc = cli(["e2e", "--config", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert "e2e: resuming at epoch 2, batch 3/" in proc.stdout
    assert e2e_state(tmp_path / "run") == e2e_state(tmp_path / "ref")


# -- checkpoints are data ------------------------------------------------------------------------------
def _touch(path: str) -> None:
    Path(path).touch()


class Planted:
    """Unpickling this runs `_touch(marker)`: what an attacker's object would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


@pytest.fixture
def stage0(tmp_path):
    """A run whose stage 0 is trained, with a checkpoint.prev.pt a fallback could use."""
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", train={"checkpoint_steps": 4}))
    assert main(["stage", "--config", str(path), "--j", "0", "--no-cache"]) == 0
    stage = tmp_path / "run" / "stages" / "stage_0"
    assert (stage / "checkpoint.prev.pt").exists()
    return path, stage


def test_a_planted_checkpoint_is_refused_without_running_its_code(stage0, tmp_path, capsys):
    path, stage = stage0
    marker = tmp_path / "code-ran"
    ck = torch.load(stage / "checkpoint.pt", weights_only=True)
    ck["stats"] = Planted(marker)
    torch.save(ck, stage / "checkpoint.pt")
    # `train` as the real command; `status`, which loads the checkpoint the same way, through main here
    proc = cli(["train", "--config", str(path)])
    capsys.readouterr()
    results = [(proc.returncode, proc.stderr), (main(["status", "--config", str(path)]), capsys.readouterr().err)]
    for code, err in results:
        assert code == 2, err
        err = err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        assert err.startswith(f"error: {stage / 'checkpoint.pt'}: refused: loading it would need the Python object ")
        assert "._touch" in err and "none of its code was run" in err
        assert not marker.exists()
    # no silent fallback to checkpoint.prev.pt either: stage 0 was not retrained from it
    assert "unreadable checkpoint" not in proc.stdout
    # and the file was live: the loader cachetrain used before would have run it
    torch.load(stage / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_a_planted_previous_checkpoint_is_refused_too_and_a_foreign_file_is_named(tmp_path):
    run = Checkpoints(RunLayout.of(tmp_path / "run"))
    stage = run.layout.unit_dir(0)
    stage.mkdir(parents=True)
    (stage / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated by a crash")
    torch.save({"model": {}, "epoch": Planted(tmp_path / "code-ran")}, stage / "checkpoint.prev.pt")
    with pytest.raises(CheckpointError, match=f"^{stage / 'checkpoint.prev.pt'}: refused: .*none of its code was run"):
        run.load(0)
    assert not (tmp_path / "code-ran").exists()
    torch.save({"weight": torch.zeros(2)}, stage / "checkpoint.pt")  # loads, but is nobody's checkpoint
    with pytest.raises(CheckpointError, match="not a cachetrain checkpoint \\(no model, optimizer"):
        run.load(0)


# -- checkpoints that do not fit the model -------------------------------------------------------------
def _copy_checkpoint(src: Path, dst: Path, cfg: Config) -> None:
    """A checkpoint copied in from another run, its recorded config made this run's: only shapes differ."""
    ck = torch.load(src, weights_only=True)
    ck["config"] = cfg.to_dict()
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, dst)


def _first_mismatch(a: torch.nn.Module, b: torch.nn.Module) -> tuple[str, list, list]:
    return next((k, list(v.shape), list(b.state_dict()[k].shape)) for k, v in a.state_dict().items()
                if v.shape != b.state_dict()[k].shape)


@pytest.mark.slow
def test_a_checkpoint_for_another_width_is_one_line_naming_file_parameter_and_shapes(tmp_path, capsys):
    narrow_raw = synthetic_raw(tmp_path / "narrow", train={"checkpoint_steps": 3})
    wide_raw = synthetic_raw(tmp_path / "wide", model={"width": 12}, train={"checkpoint_steps": 3})
    narrow, wide = (write_config(tmp_path / f"{n}.yaml", r) for n, r in (("narrow", narrow_raw), ("wide", wide_raw)))
    wide_cfg = Config.from_dict(wide_raw)
    g_narrow, g_wide = greedy_of(Config.from_dict(narrow_raw)), greedy_of(wide_cfg)
    name, theirs, ours = _first_mismatch(g_narrow.inputs.net.stages[0], g_wide.inputs.net.stages[0])

    # stage 0 resumed mid-epoch from the copied checkpoint
    assert cli(["stage", "--config", str(narrow), "--j", "0"], fault="train_step:5").returncode == -signal.SIGKILL
    copied = tmp_path / "wide" / "stages" / "stage_0" / "checkpoint.pt"
    _copy_checkpoint(tmp_path / "narrow" / "stages" / "stage_0" / "checkpoint.pt", copied, wide_cfg)
    proc = cli(["train", "--config", str(wide)])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {copied}: model parameter {name} has shape {theirs} in the checkpoint but "
                                  f"{ours} in the configured model; ")

    # a trained stage 0 assembled by `eval` (Greedy.trained_stage)
    assert main(["stage", "--config", str(narrow), "--j", "0", "--no-cache"]) == 0
    _copy_checkpoint(tmp_path / "narrow" / "stages" / "stage_0" / "checkpoint.pt", copied, wide_cfg)
    capsys.readouterr()
    assert main(["eval", "--config", str(wide)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{copied}: model parameter {name} has shape {theirs}" in err

    # the end-to-end baseline, resumed mid-epoch
    assert cli(["e2e", "--config", str(narrow)], fault="train_step:5").returncode == -signal.SIGKILL
    copied = tmp_path / "wide" / "e2e" / "checkpoint.pt"
    _copy_checkpoint(tmp_path / "narrow" / "e2e" / "checkpoint.pt", copied, wide_cfg)
    capsys.readouterr()
    assert main(["e2e", "--config", str(wide)]) == 2  # the real command's one line is checked for `train` above
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {copied}: model parameter 0.{name} has shape {theirs} in the checkpoint")


def test_load_state_names_missing_and_extra_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))

    def checkpoint(state: dict) -> Checkpoint:
        return Checkpoint(unit=0, k=1, model=state, optimizer={}, scheduler={}, epoch=1, epochs=1)

    with pytest.raises(CheckpointError, match="model has no 0.bias, which the configured model has"):
        checkpoint({"0.weight": torch.zeros(3, 2)}).load_state(model)
    state = {**model.state_dict(), "1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="model has 1.weight, which the configured model has not"):
        checkpoint(state).load_state(model)


# -- read-only run directory or data root --------------------------------------------------------------
def read_only(monkeypatch, root: Path, err: int) -> None:
    """Make every write under `root` fail with `err` (EROFS, EACCES), as a read-only mount or a folder of
    another user would. In-process and simulated: the tests run as root, and chmod does not stop root."""
    root_s = os.path.abspath(root)

    def blocked(path) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.abspath(os.fsdecode(os.fspath(path)))
        return p == root_s or p.startswith(root_s + os.sep)

    def fail(path):
        raise OSError(err, os.strerror(err), os.fsdecode(os.fspath(path)))  # EACCES: a PermissionError

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and blocked(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and blocked(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if blocked(path) and not os.path.isdir(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize("err, why", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
@pytest.mark.parametrize("where", ["run", "run/stages"])
def test_an_unwritable_run_directory_is_one_line_exit_2(tmp_path, monkeypatch, capsys, err, why, where):
    """The whole run directory (the lock is the first write), or only its stages folder (the first
    checkpoint, deep in training)."""
    path = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run", model={"stages": 1, "downsample": []}))
    (tmp_path / "run").mkdir()
    read_only(monkeypatch, tmp_path / where, err)
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 2
    out = capsys.readouterr().err
    first = tmp_path / "run" / ".lock" if where == "run" else tmp_path / "run" / "stages"
    assert out == (f"error: cannot write {first}: {why}; checkpoints, metrics and caches go in the run directory "
                   f"{tmp_path / 'run'}: use a writable one with --run DIR (or run_dir in the config)\n")


def test_an_unwritable_data_root_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs the Debian fashion-mnist package")
    raw = fmnist_raw(tmp_path / "run", train=64, test=64)
    raw["data"]["root"] = str(tmp_path / "data")
    path = write_config(tmp_path / "c.yaml", raw)
    read_only(monkeypatch, tmp_path / "data", errno.EROFS)
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 2
    # cachetrain.data.tensors words this one itself (a DataError); cachetrain.durable.unwritable_message is the
    # fallback for a data-root write that escapes it: either way one line naming the folder and the setting
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(tmp_path / "data") in err and "data.root" in err and "CACHETRAIN_DATA" in err


def test_a_really_read_only_mount_is_one_line_exit_2(tmp_path):
    """The same on a real read-only tmpfs, in a real process, where this machine lets us mount one."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = write_config(tmp_path / "c.yaml", synthetic_raw(mount / "run", model={"stages": 1, "downsample": []}))
        proc = cli(["train", "--config", str(path)])
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: cannot write {mount / 'run'}: read-only file system; ")
        assert "--run DIR" in proc.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    shutil.rmtree(mount, ignore_errors=True)
