"""Shared fixtures and helpers. A test module imports helpers from here (`from tests.conftest import ...`),
never from another test module.

- run configs: `synthetic_raw` (a tiny synthetic run), `fmnist_raw` (a Fashion-MNIST subset), `write_config`,
  `tiny_run` (a config file and its Config), `greedy_of` (the greedy loop over a config's run), `tiny_greedy`
  (a Greedy on a tiny run);
- the command line in a real process: `cli`, `cli_popen`; the same command in this process: `cli_in_process`;
- stores for the cache and loader tests: `store_info`, `batches_of`, `Doubler`, `make_store` (a store whose
  features name their samples), `sample_ids`;
- damaging a store as a crash or a bad disk would: `cut_short`, `flip_bytes`;
- watching the code under test from outside, at the standard library's boundary: `mappings` (every
  `mmap.mmap` made and every `madvise`), `fsyncs` (every `os.fsync`), `child_pids` (this process's live
  child processes, e.g. DataLoader workers).

No test reads a private attribute of the package: every property is checked through public methods or
the standard-library hooks above.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cachetrain.config import Config, load_config


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> Path:
    """Unpack the datasets into a scratch folder, never into the user's ~/.cache."""
    path = tmp_path_factory.mktemp("data")
    os.environ["CACHETRAIN_DATA"] = str(path)
    return path


# -- run configs ------------------------------------------------------------------------------------

def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def synthetic_raw(run_dir: Path, **sections) -> dict:
    """A tiny layercnn on 8x16x16 synthetic images: seconds per stage on one core."""
    raw = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "data": {"name": "synthetic", "shape": [3, 16, 16], "num_classes": 4, "synthetic_train": 384,
                 "synthetic_test": 128},
        "model": {"arch": "layercnn", "stages": 3, "width": 8, "downsample": [1], "k": 2},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "cache": {"chunk_mib": 0.0625, "batch_size": 64},
        "loader": {"workers": 0, "window_chunks": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def tiny_run(tmp_path: Path, name: str = "tiny.yaml", **sections) -> tuple[Path, Config]:
    """A tiny synthetic run in `tmp_path/run`: its config file (for the CLI) and the same config, parsed."""
    raw = synthetic_raw(tmp_path / "run", **sections)
    return write_config(tmp_path / name, raw), Config.from_dict(raw)


def greedy_of(cfg: Config):
    """The greedy loop (cachetrain.train.greedy) over the run of `cfg`, opened without a lock, as tests and
    benchmarks drive it (commands open runs through Run.open)."""
    from cachetrain.run import Run
    from cachetrain.train.greedy import Greedy

    return Greedy(Run(cfg))


def tiny_greedy(run_dir: Path, **sections):
    """A Greedy driver on a tiny synthetic run in `run_dir` (nothing trained yet)."""
    return greedy_of(Config.from_dict(synthetic_raw(run_dir, **sections)))


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    return Config.from_dict(synthetic_raw(tmp_path / "run"))


@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run"))


def fmnist_raw(run_dir: Path, train: int = 2000, test: int = 1000) -> dict:
    return {
        "name": "fmnist-subset",
        "run_dir": str(run_dir),
        "data": {"name": "fmnist", "train_subset": train, "test_subset": test},
        "model": {"arch": "layercnn", "stages": 3, "width": 16, "downsample": [1], "k": 2},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.05},
        "cache": {"chunk_mib": 0.5},
        "loader": {"workers": 1},
    }


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def load(path: Path, *overrides: str) -> Config:
    return load_config(path, list(overrides))


# -- the command line in a real process --------------------------------------------------------------

def _cli_env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CACHETRAIN_FAULT"}
    if fault:
        env["CACHETRAIN_FAULT"] = fault  # a named point where the process SIGKILLs itself (cachetrain/faults.py)
    return env


def cli(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cachetrain.cli ARGS` in its own process, to completion (or to the fault that kills it)."""
    return subprocess.run([sys.executable, "-m", "cachetrain.cli", *args], env=_cli_env(fault), capture_output=True,
                          text=True, timeout=timeout)


def cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """The same command run as `cachetrain.cli.main(args)` in this process, with what it prints captured as
    `cli` captures a process's output: seconds cheaper (no torch import). An exception escaping main is
    printed as the interpreter would (a traceback, exit status 1), so a one-line check fails on it as it
    would for the real command. For cases whose point is not the process boundary; keep one real
    process per kind of user-visible error. No fault injection here: CACHETRAIN_FAULT is read per process."""
    from cachetrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - reported as the process would report it
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["cachetrain", *args], code, out.getvalue(), err.getvalue())


def cli_popen(args: list[str]) -> subprocess.Popen:
    """The same command, started and left running (for a test that kills it from outside)."""
    return subprocess.Popen([sys.executable, "-m", "cachetrain.cli", *args], env=_cli_env(None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- stores for the cache and loader tests ----------------------------------------------------------

def store_info(n: int, shape: tuple[int, ...], chunk: int, dtype: str = "float16", codec: str = "zstd",
               fp: str = "fp", split: str = "train"):
    from cachetrain.cache import StoreInfo

    return StoreInfo(stage=0, k=1, split=split, fingerprint=fp, weights_hash="w", input_fingerprint="i", dtype=dtype,
                     codec=codec, level=1, num_samples=n, sample_shape=tuple(shape), chunk_samples=chunk)


def batches_of(x: torch.Tensor):
    """The `batches(start, size)` a store writer takes: x in sample order from `start` (no labels needed)."""
    def batches(start, size):
        for i in range(start, len(x), size):
            yield x[i:i + size], None
    return batches


class Doubler(torch.nn.Module):
    """A 'stage' whose output is known exactly (twice its input), counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return 2 * x


STORE_N, STORE_SHAPE = 300, (2, 3, 3)


def make_store(path: Path, n: int = STORE_N, chunk: int = 32, codec: str = "zstd", offset: int = 0):
    """A store whose sample i has every feature equal to i + offset (exact in fp16 below 2048), and label
    i % 10: a batch names its samples. Returns a CacheReader on it."""
    from cachetrain.cache import CacheReader, plan_layout, write_store

    x = offset + torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, *STORE_SHAPE).contiguous()
    info = store_info(n, STORE_SHAPE, chunk, codec=codec, split=Path(str(path)).stem)
    layout = plan_layout(info.sample_bytes, chunk * info.sample_bytes / 2**20, n, chunk)
    write_store(path, info, np.arange(n) % 10, torch.nn.Identity(), batches_of(x), layout, torch.device("cpu"))
    return CacheReader(path, "fp")


def sample_ids(batches, offset: int = 0) -> np.ndarray:
    """The samples of batches from a `make_store` store, in the order they came; checks that each batch holds
    whole samples (not a mix of two) and that every label travelled with its sample."""
    out = []
    for x, y in batches:
        ids = x[:, 0, 0, 0].long()
        assert torch.equal(x, ids[:, None, None, None].to(x.dtype).expand_as(x)), "a sample's features were mixed"
        assert torch.equal(y, (ids - offset) % 10), "labels do not match their samples"
        out.append(ids.clone())
    return torch.cat(out).numpy() - offset if out else np.zeros(0, dtype=np.int64)


# -- damaging a store ----------------------------------------------------------------------------------

def cut_short(file: Path, keep: int) -> None:
    """Keep the first `keep` bytes of `file` (negative: drop that many from its end), as a power cut can
    leave a file renamed into place before its data reached the disk."""
    data = Path(file).read_bytes()
    Path(file).write_bytes(data[:keep])


def flip_bytes(file: Path, at: int | None = None, count: int = 2) -> None:
    """Invert `count` bytes of `file` from `at` (default: its middle), leaving its size unchanged."""
    data = bytearray(Path(file).read_bytes())
    at = len(data) // 2 if at is None else at
    for i in range(at, at + count):
        data[i] ^= 0xFF
    Path(file).write_bytes(bytes(data))


# -- watching from outside ------------------------------------------------------------------------------

def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class MappingLog:
    """Every memory mapping made while installed (`mapped`: the file of each, in order) and every
    madvise(MADV_WILLNEED) issued on one (`advised`), recorded by a subclass of `mmap.mmap`."""

    def __init__(self):
        self.mapped: list[str] = []
        self.advised: list[str] = []

    def chunks(self, reader, kind: str = "mapped") -> list[int]:
        """The chunks of `reader`'s store in `mapped` or `advised`, in order."""
        files = {str(Path(reader.chunk_path(c)).resolve()): c for c in range(reader.info.num_chunks)}
        return [files[f] for f in getattr(self, kind) if f in files]

    def open_files(self, reader) -> int:
        """Descriptors this process holds open on `reader`'s chunk files (before Python 3.13, one per mapping)."""
        files = {str(Path(reader.chunk_path(c)).resolve()) for c in range(reader.info.num_chunks)}
        held = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                held += _fd_path(int(fd)) in files
            except OSError:
                pass  # the descriptor listdir itself used, already closed
        return held


@pytest.fixture
def mappings(monkeypatch) -> MappingLog:
    log = MappingLog()
    base = mmap.mmap

    class Recorded(base):
        def __new__(cls, fileno, *args, **kwargs):
            self = super().__new__(cls, fileno, *args, **kwargs)
            self.file = _fd_path(fileno)
            log.mapped.append(self.file)
            return self

        def madvise(self, option, *args):
            if option == getattr(mmap, "MADV_WILLNEED", None):
                log.advised.append(self.file)
            return super().madvise(option, *args)

    monkeypatch.setattr(mmap, "mmap", Recorded)
    return log


@pytest.fixture
def fsyncs(monkeypatch) -> list[Path]:
    """The path of every file or folder `os.fsync`ed while the test runs, in order (from any thread)."""
    synced: list[Path] = []
    fsync = os.fsync

    def recording(fd):
        synced.append(Path(_fd_path(fd)))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def child_pids() -> set[int]:
    """The pids of this process's live child processes (DataLoader workers among them)."""
    return {p.pid for p in multiprocessing.active_children()}


# -- property-based tests (hypothesis) -------------------------------------------------------------------
# one profile for every property test: the same examples on every run and machine (derandomize: CI is
# deterministic, a failure reproduces), no example database written into the checkout, no per-example
# deadline (a shared 2-core machine varies), and a small default budget so the suite stays within its time.
# HYPOTHESIS_PROFILE=search runs many more examples, randomized, for a hunt by hand.
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings

    _hypothesis_settings.register_profile(
        "cachetrain", derandomize=True, database=None, deadline=None, max_examples=25, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much])
    _hypothesis_settings.register_profile("search", parent=_hypothesis_settings.get_profile("cachetrain"),
                                          derandomize=False, max_examples=500)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cachetrain"))
except ImportError:  # the property tests skip themselves (pytest.importorskip)
    pass
