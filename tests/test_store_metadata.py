"""A store whose metadata disagrees with its record is refused on open, before any read, and `--repair`
restores or rebuilds it (issue 25): the features, labels and manifest arrays' zarr.json (dtype, shape,
chunk shape, codecs, fill value) must be what the store's StoreInfo says the stage wrote, and the record
itself (the group attributes) must be the one written with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cachetrain.cache import CacheError, CacheReader, CacheState, store_state
from cachetrain.cache.loader import CacheLoader
from cachetrain.cache.verify import verify_store
from cachetrain.cli import main
from cachetrain.train.caching import drop_corrupt_chunks
from tests.conftest import STORE_N, make_store, sample_ids, synthetic_raw, write_config


def edit_json(file: Path, edit) -> None:
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        node = meta
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def all_samples(reader: CacheReader) -> np.ndarray:
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    return sample_ids(loader.batches(np.arange(reader.info.num_samples), 64))


def repair(path: Path, codec: str = "zstd") -> None:
    """What `cachetrain cache --j J --repair` does to one store: drop what verify finds, then a caching pass."""
    drop_corrupt_chunks([("train", 0, path)])
    make_store(path, codec=codec)


TAMPERS = [  # (file under the store, edit, words the refusal names)
    ("features/zarr.json", _set("data_type", "float32"), "data_type"),
    ("features/zarr.json", _set("shape", 0, 10**12), "shape"),
    ("features/zarr.json", _set("chunk_grid", "configuration", "chunk_shape", 0, 16), "chunk_grid"),
    ("features/zarr.json", _set("fill_value", 7.0), "fill_value"),
    ("features/zarr.json", _set("codecs", 0, "configuration", "endian", "big"), "codecs"),
    ("labels/zarr.json", _set("data_type", "int32"), "data_type"),
    ("chunk_crc32c/zarr.json", _set("shape", 0, 3), "shape"),
    ("zarr.json", _set("attributes", "num_samples", 10**12), "attributes"),
    ("zarr.json", _set("attributes", "view", 3), "attributes"),
    ("zarr.json", _set("attributes", "content_digest", "0" * 16), "content_digest"),
]


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("file, edit, named", TAMPERS, ids=[f"{f}:{n}" for f, _, n in TAMPERS])
def test_metadata_that_disagrees_with_the_record_is_refused_then_repaired(tmp_path, file, edit, named, codec):
    path = tmp_path / "train.zarr"
    make_store(path, codec=codec)
    edit_json(path / file, edit)
    with pytest.raises(CacheError) as e:
        CacheReader(path, "fp")
    assert named in str(e.value) and "\n" not in str(e.value) and "--repair" in str(e.value)
    problems = verify_store(path)
    assert len(problems) == 1 and problems[0].whole_store and named in str(problems[0])
    repair(path, codec)
    assert verify_store(path) == []
    assert np.array_equal(all_samples(CacheReader(path, "fp")), np.arange(STORE_N))


def test_a_store_with_a_huge_shape_is_damaged_at_once(tmp_path):
    path = tmp_path / "train.zarr"
    make_store(path)
    edit_json(path / "zarr.json", _set("attributes", "num_samples", 10**12))
    edit_json(path / "features" / "zarr.json", _set("shape", 0, 10**12))
    state, info = store_state(path, "fp")  # a presence check of 10**12 / 32 chunks would never end
    assert state is CacheState.DAMAGED


def small(run: Path) -> dict:
    """Two stages on 192 synthetic images, no probes: the cheapest run with a cache."""
    return synthetic_raw(run, model={"stages": 2}, data={"synthetic_train": 192, "synthetic_test": 64},
                         train={"probes": False})


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trained")
    path = write_config(d / "tiny.yaml", small(d / "run"))
    assert main(["train", "--config", str(path)]) == 0
    return d / "run"


@pytest.fixture
def trained(trained_once, tmp_path) -> tuple[Path, Path]:
    shutil.copytree(trained_once, tmp_path / "run")
    config = write_config(tmp_path / "tiny.yaml", small(tmp_path / "run"))
    return config, tmp_path / "run" / "cache" / "stage_0" / "train.zarr"


def test_cli_dtype_changed_repair_restores_it_and_verify_passes(trained, capsys):
    config, store = trained
    meta = (store / "features" / "zarr.json").read_text()
    edit_json(store / "features" / "zarr.json", _set("data_type", "float32"))
    assert main(["status", "--config", str(config)]) == 0
    assert "damaged" in capsys.readouterr().out
    assert main(["cache", "--config", str(config), "--j", "0", "--repair"]) == 0
    assert json.loads((store / "features" / "zarr.json").read_text()) == json.loads(meta)
    capsys.readouterr()
    assert main(["verify", "--config", str(config)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("file, edit", [("features/zarr.json", _set("data_type", "float32")),
                                        ("features/zarr.json", _set("shape", 0, 10**12)),
                                        ("zarr.json", _set("attributes", "num_samples", 10**12))])
def test_cli_train_and_verify_notice_tampered_metadata(trained, capsys, file, edit):
    config, store = trained
    edit_json(store / file, edit)
    capsys.readouterr()
    assert main(["verify", "--config", str(config)]) == 1
    assert "train.zarr: store: " in capsys.readouterr().out
    # train repairs the damaged cache (it has everything to rebuild it) and then has nothing left to do
    assert main(["train", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["verify", "--config", str(config)]) == 0
