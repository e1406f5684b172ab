"""Trust the data: what a user's image tree or data root can get wrong is refused in one line naming the
file or folder, never trained on silently. Each case runs the command a user would type
(`cachetrain stage --config FILE`) on tiny JPEG trees and checks the exit status 2, one stderr line without
a traceback, and that nothing already on disk was lost.

Most of a real command's time is importing torch (seconds on 2 cores). So each kind of refusal is run
once as a real process (`python -m cachetrain.cli ...`: a bad image met in a DataLoader worker process,
an unwritable data root, two unpacking processes racing), and the other cases call the same entry point,
`cachetrain.cli.main`, in this process (`cli_in_process`), their output captured as a process's would be. The real
processes are started together by the `runs` fixture, a few at a time, and each test checks its own case."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from cachetrain.config import DataConfig
from cachetrain.data.tensors import load_fmnist
from cachetrain.errors import DataError
from cachetrain.data.folder import FolderImages
from tests.conftest import cli_in_process

CPU = torch.device("cpu")
THREE = {"a_shirt": 8, "b_shoe": 8, "c_bag": 8}
FMNIST_FILES = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte"]


# -- helpers ------------------------------------------------------------------------------------------
def jpeg(path: Path, value: int, size: int = 12) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    pixels = np.clip(value + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def make_tree(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    """JPEGs in <root>/{train,val}/<class>/, a brightness per class (so there is something to learn)."""
    for split, classes in (("train", train), ("val", val)):
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                jpeg(root / split / name / f"{i:03d}.jpg", 40 + 60 * (sum(map(ord, name)) % 4))
    return root


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_config(d: Path, data: dict, workers: int = 0) -> Path:
    raw = {"name": "trust", "run_dir": str(d / "run"), "data": data,
           "model": {"arch": "layercnn", "stages": 1, "width": 4, "k": 1},
           "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "device": "cpu", "checkpoint_steps": 1},
           "loader": {"backend": "numpy", "workers": workers}}
    path = d / "trust.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def folder_config(d: Path, root: Path, workers: int = 0, **data) -> Path:
    return write_config(d, {"name": "imagefolder", "root": str(root), "image_size": 8, **data}, workers)


def files(*dirs: Path) -> dict[str, str]:
    """{path: sha1} of every file under dirs."""
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for d in dirs if d.exists()
            for p in sorted(d.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, str], *dirs: Path) -> None:
    after = files(*dirs)
    lost = sorted(p for p, digest in before.items() if after.get(p) != digest)
    assert not lost, f"changed or removed: {lost}"


def assert_user_error(result: subprocess.CompletedProcess, *names: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-4000:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# -- the commands, prepared here and run together by the `runs` fixture ---------------------------------
@dataclass
class Case:
    dir: Path
    config: Path | None  # `cachetrain stage --config config`; None: `job` runs instead
    root: Path  # the data: every file there before the command must be there after it, unchanged
    bad: list[Path] = field(default_factory=list)
    env: dict | None = None
    preexec: Callable[[], None] | None = None
    job: Callable[[Case], None] | None = None
    before: dict[str, str] = field(default_factory=dict)
    result: subprocess.CompletedProcess | None = None
    error: str | None = None  # the command could not be started as asked (see the read-only case)
    outputs: list = field(default_factory=list)  # a job's ((stdout, stderr), returncode) per process
    real: bool = True  # False: the command runs as `main(argv)` in this process (module docstring)

    def run(self) -> None:
        if self.job is not None:
            self.job(self)
        else:
            self.command()

    def command(self) -> None:
        if not self.real:
            self.result = cli_in_process(["stage", "--config", str(self.config)])
            return
        try:
            self.result = subprocess.run(
                [sys.executable, "-m", "cachetrain.cli", "stage", "--config", str(self.config)], cwd=self.dir,
                capture_output=True, text=True, timeout=600, preexec_fn=self.preexec, env=self.env)
        except subprocess.SubprocessError as e:
            self.error = str(e)


PREPARE: dict[str, Callable[[Path], Case]] = {}


def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    PREPARE[fn.__name__] = fn
    return fn


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Case]:
    cases = {name: prepare(tmp_path_factory.mktemp(name)) for name, prepare in PREPARE.items()}
    for c in cases.values():
        c.before = files(c.root)
    # in-process commands first, one at a time (main is not made to share a process with itself), and
    # before any thread exists that might fork a child with a preexec_fn while main holds a lock
    for c in cases.values():
        if not c.real:
            c.run()
    real = sorted((c for c in cases.values() if c.real), key=lambda c: c.job is None)
    with ThreadPoolExecutor(3) as pool:  # each command is a process; threads only wait for them
        for future in [pool.submit(c.run) for c in real]:
            future.result()
    return cases


# -- class lists --------------------------------------------------------------------------------------
@case
def val_only_class(d: Path) -> Case:
    root = make_tree(d / "data", THREE, {"b_shoe": 2, "c_bag": 2, "zz_extra": 2})
    return Case(d, folder_config(d, root), root, real=False)


def test_a_val_class_train_lacks_is_refused_naming_it(runs):
    c = runs["val_only_class"]
    line = assert_user_error(c.result, "zz_extra", str(c.root / "val"))
    assert "lacks a_shirt" in line  # the extra class named as extra, the missing one as missing
    assert_kept(c.before, c.root)
    assert not (c.dir / "run" / "stages").exists()  # nothing was trained on shifted labels


@case
def train_class_without_val(d: Path) -> Case:
    root = make_tree(d / "data", THREE, {"b_shoe": 3, "c_bag": 3})
    return Case(d, folder_config(d, root), root, real=False)


def test_a_train_class_without_val_folder_warns_and_trains(runs):
    c = runs["train_class_without_val"]
    assert c.result.returncode == 0, c.result.stderr[-4000:]
    warning = next(line for line in c.result.stdout.splitlines() if line.startswith("warning:"))
    assert "a_shirt" in warning and str(c.root / "val") in warning and "1 of 3" in warning
    assert (c.dir / "run" / "stages" / "stage_0" / "checkpoint.pt").exists()


def test_val_labels_are_the_train_class_index_of_the_same_name(tmp_path):
    # val lacks the first class: torchvision's ImageFolder would number b_shoe 0 in val and 1 in train
    root = make_tree(tmp_path / "data", THREE, {"b_shoe": 3, "c_bag": 2})
    data = FolderImages(DataConfig(name="imagefolder", root=str(root), image_size=8), 0, CPU, workers=0,
                        backend="numpy")
    assert data.classes == ["a_shirt", "b_shoe", "c_bag"] and data.num_classes == 3
    assert data.missing_val_classes == ["a_shirt"] and data.metadata()["classes"] == data.classes
    for split in ("train", "test"):
        assert data.labels(split).tolist() == [data.classes.index(Path(p).parent.name) for p in data.files(split)]
    assert torch.cat([y for _, y in data.eval_batches("test", 4)]).tolist() == [1, 1, 1, 2, 2]
    assert data.labels("test").tolist() == [1, 1, 1, 2, 2]  # what the DALI path reads
    # the class list is part of what the caches record as their input
    renamed = make_tree(tmp_path / "renamed", {"a_shirt": 8, "b_shoe": 8, "d_bag": 8}, {"b_shoe": 3, "d_bag": 2})
    other = FolderImages(DataConfig(name="imagefolder", root=str(renamed), image_size=8), 0, CPU, 0, "numpy")
    assert other.fingerprint != data.fingerprint


# -- bad files ----------------------------------------------------------------------------------------
@case
def empty_class(d: Path) -> Case:
    root = make_tree(d / "data", THREE, THREE)
    (root / "train" / "d_empty").mkdir()
    return Case(d, folder_config(d, root), root, bad=[root / "train" / "d_empty"], real=False)


def test_an_empty_class_folder_is_refused_naming_it(runs):
    c = runs["empty_class"]
    assert_user_error(c.result, str(c.bad[0]), "no images")
    assert_kept(c.before, c.root)


@case
def non_image_file(d: Path) -> Case:
    root = make_tree(d / "data", THREE, THREE)
    notes = root / "train" / "b_shoe" / "notes.txt"
    notes.write_text("shot on 2024-05-01\n")
    return Case(d, folder_config(d, root), root, bad=[notes], real=False)


def test_a_non_image_file_is_refused_naming_it(runs):
    c = runs["non_image_file"]
    assert_user_error(c.result, str(c.bad[0]), "not an image file", "data.skip_bad_images")
    assert_kept(c.before, c.root)


def truncated_jpeg(d: Path, workers: int, real: bool) -> Case:
    root = make_tree(d / "data", THREE, {"a_shirt": 3, "b_shoe": 3, "c_bag": 3})
    return Case(d, folder_config(d, root, workers=workers), root, bad=[truncate(root / "val" / "b_shoe" / "001.jpg")],
                real=real)


PREPARE["truncated_jpeg_0"] = lambda d: truncated_jpeg(d, workers=0, real=False)
# decoded in a DataLoader worker process, by the real command: a bad file's refusal end to end
PREPARE["truncated_jpeg_1"] = lambda d: truncated_jpeg(d, workers=1, real=True)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_jpeg_stops_the_run_in_one_line_naming_it(runs, workers):
    c = runs[f"truncated_jpeg_{workers}"]
    assert_user_error(c.result, str(c.bad[0]), "truncated", "data.skip_bad_images")
    assert_kept(c.before, c.root)
    # the epoch's steps were checkpointed before its evaluation met the file: kept, and a rerun resumes there
    ck = torch.load(c.dir / "run" / "stages" / "stage_0" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 0 and ck["batch"] == 2  # 24 images, batch 8: after steps 1 and 2 of 3


@case
def skip_bad_images(d: Path) -> Case:
    root = make_tree(d / "data", THREE, THREE)
    bad = [truncate(root / "train" / "a_shirt" / "002.jpg"), root / "train" / "c_bag" / "notes.txt",
           root / "val" / "b_shoe" / "000.jpg"]
    bad[1].write_text("not an image")
    bad[2].write_bytes(b"<html>not a jpeg</html>")
    return Case(d, folder_config(d, root, workers=1, skip_bad_images=True), root, bad=bad, real=False)


def test_skip_bad_images_leaves_them_out_counted_and_logged(runs):
    c = runs["skip_bad_images"]
    assert c.result.returncode == 0, c.result.stderr[-4000:]
    assert f"skipped 3 bad files under {c.root}" in c.result.stdout, c.result.stdout
    assert_kept(c.before, c.root)  # left out, not deleted
    cfg = DataConfig(name="imagefolder", root=str(c.root), image_size=8, skip_bad_images=True)
    data = FolderImages(cfg, 0, CPU, workers=0, backend="numpy")
    assert sorted(p for p, _ in data.skipped_files) == sorted(str(p.relative_to(c.root)) for p in c.bad)
    assert all(m["reason"] for m in data.metadata()["skipped_files"])
    # 23 training images kept, 2 of them held out for validation (data.val_samples: 1/12)
    assert data.num_samples("train") == 21 and data.num_samples("val") == 2 and data.num_samples("test") == 23
    for epoch in (0, 1):  # the same sample set every epoch
        assert sum(len(y) for _, y in data.train_batches(epoch, 8)) == 21
    # what was left out is in the fingerprint: the tree after a repair is another input
    jpeg(c.bad[0], 100)
    assert FolderImages(cfg, 0, CPU, workers=0, backend="numpy").fingerprint != data.fingerprint


def test_dali_names_a_file_it_cannot_decode(tmp_path):
    root = make_tree(tmp_path / "data", {"a_shirt": 4, "b_shoe": 4}, {"a_shirt": 3, "b_shoe": 3})
    bad = truncate(root / "val" / "b_shoe" / "002.jpg")
    data = FolderImages(DataConfig(name="imagefolder", root=str(root), image_size=8), 0, CPU, workers=1,
                        backend="dali")
    with pytest.raises(DataError) as e:
        list(data.eval_batches("test", 2))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


# -- the Fashion-MNIST data root ----------------------------------------------------------------------
RACE = r"""
import os, sys, time
from pathlib import Path
import torch
from cachetrain.config import DataConfig
from cachetrain.data import open_dataset

me, base, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):  # both processes start each round together, on a fresh empty data root
    (base / f"ready{r}.{me}").touch()
    while not all((base / f"ready{r}.{p}").exists() for p in "ab"):
        time.sleep(0.001)
    os.environ["CACHETRAIN_DATA"] = str(base / f"round{r}")
    data = open_dataset(DataConfig(name="fmnist", train_subset=64, test_subset=64), 0, torch.device("cpu"))
    assert data.num_samples("train") + data.num_samples("val") == 64 and data.labels("test").max() <= 9
print("opened", rounds)
"""
ROUNDS = 5


def race(c: Case) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RACE, me, str(c.dir), str(ROUNDS)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for me in "ab"]
    c.outputs = [(p.communicate(timeout=600), p.returncode) for p in procs]


@case
def unpack_race(d: Path) -> Case:
    for r in range(ROUNDS):
        (d / f"round{r}").mkdir()
    return Case(d, None, d, job=race)


def test_two_first_runs_unpacking_into_one_data_root_both_succeed(runs):
    c = runs["unpack_race"]
    for (out, err), rc in c.outputs:
        assert rc == 0 and f"opened {ROUNDS}" in out, err[-4000:]
    for r in range(ROUNDS):  # whole files under their final names, no leftovers of either process
        raw = c.dir / f"round{r}" / "FashionMNIST" / "raw"
        assert sorted(p.name for p in raw.iterdir() if p.name != ".unpack.lock") == FMNIST_FILES
        assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 28 * 28


def _without_dac_override() -> None:
    """In the child of a root process: drop the capabilities that let root write through permission bits
    (prctl PR_CAPBSET_DROP of CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH); the program it execs then meets
    chmod 0o555 as any other user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def read_only(c: Case) -> None:
    c.root.chmod(0o555)
    try:
        c.command()
    finally:
        c.root.chmod(0o755)


@case
def read_only_root(d: Path) -> Case:
    readonly = d / "readonly"
    readonly.mkdir()
    config = write_config(d, {"name": "fmnist", "train_subset": 64, "test_subset": 64})
    return Case(d, config, readonly, env={**os.environ, "CACHETRAIN_DATA": str(readonly)}, job=read_only,
                preexec=_without_dac_override if os.geteuid() == 0 else None)  # root ignores permission bits


def test_a_read_only_data_root_is_one_line_naming_it(runs):
    c = runs["read_only_root"]
    if c.error:  # no CAP_SETPCAP to drop root's override: test_a_read_only_file_system_... covers the path
        pytest.skip(f"cannot make a folder read-only for this root process ({c.error})")
    assert_user_error(c.result, str(c.root), "Permission denied", "data.root or $CACHETRAIN_DATA")
    assert list(c.root.iterdir()) == []


def test_a_read_only_file_system_is_one_line_naming_it(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(DataError) as e:
        load_fmnist(DataConfig(root=str(tmp_path / "mnt")), 0, CPU)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "mnt") in message and "Read-only file system" in message
    assert "data.root or $CACHETRAIN_DATA" in message
