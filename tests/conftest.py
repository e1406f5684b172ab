"""Shared fixtures: tiny configs on synthetic data, and a Fashion-MNIST subset on the real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from cachetrain.config import Config, load_config


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> Path:
    """Unpack the datasets into a scratch folder, never into the user's ~/.cache."""
    path = tmp_path_factory.mktemp("data")
    os.environ["CACHETRAIN_DATA"] = str(path)
    return path


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
