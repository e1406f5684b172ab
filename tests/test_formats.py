"""The storage-format registry (cachetrain/cache/formats.py): each format's encode and decode against
values worked out by hand, its bytes per element, its fingerprint tag, and that the config, the
planner and the plan table all see the same set of formats."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
import zarr
from rich.console import Console

from cachetrain.cache import CacheError, CacheReader
from cachetrain.cache.formats import FORMATS, storage_tag
from cachetrain.config import CacheConfig
from cachetrain.plan.planner import FLOPS, StageCost, Workload, describe, plan, sample_bytes
from cachetrain.ui import plan_table
from tests.conftest import make_store


def column(*values: float) -> torch.Tensor:
    """Values as a (1, 1, 1, n) batch: one sample, one channel, as stage outputs come."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def round_trip(name: str, y: torch.Tensor, quant=None) -> tuple[np.ndarray, torch.Tensor]:
    """(what the store's files hold, what a reader gets back from them)."""
    fmt = FORMATS[name]
    stored = fmt.encode(y, quant)
    return stored, fmt.decode(fmt.as_tensor(stored), quant)


def test_registry_names_are_the_configs_choices_in_order():
    choices = typing.get_args(typing.get_type_hints(CacheConfig)["dtype"])
    assert list(FORMATS) == list(choices)
    assert all(FORMATS[name].name == name for name in FORMATS)


def test_bytes_per_element_and_what_the_files_hold():
    assert {n: f.itemsize for n, f in FORMATS.items()} == {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}
    # numpy has no bfloat16: its files hold the raw bits as uint16 (stores written before the registry too)
    assert {n: f.numpy_dtype for n, f in FORMATS.items()} == {
        "float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "uint8": np.uint8}
    assert {n: f.torch_dtype for n, f in FORMATS.items()} == {
        "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}
    assert [n for n, f in FORMATS.items() if f.calibrated] == ["uint8"]


def test_float16_rounds_to_nearest_even():
    # 1/3 -> 0x3555 = 0.333251953125; 2049 lies halfway between 2048 and 2050 (spacing 2): ties to even
    stored, back = round_trip("float16", column(1 / 3, 2049.0, -0.5))
    assert stored.dtype == np.float16
    assert stored.reshape(-1).view(np.uint16).tolist() == [0x3555, 0x6800, 0xB800]
    assert back.dtype == torch.float32 and back.reshape(-1).tolist() == [0.333251953125, 2048.0, -0.5]


def test_bfloat16_is_stored_as_its_raw_bits():
    # 1/3 is 0x3EAAAAAB in float32: the dropped half 0xAAAB is more than half a step, so it rounds up
    stored, back = round_trip("bfloat16", column(1.0, -2.5, 1 / 3))
    assert stored.dtype == np.uint16 and stored.reshape(-1).tolist() == [0x3F80, 0xC020, 0x3EAB]
    assert back.dtype == torch.float32 and back.reshape(-1).tolist() == [1.0, -2.5, 0.333984375]
    raw = FORMATS["bfloat16"].as_tensor(np.array([0x4049, 0xBF80], dtype=np.uint16))  # a block as read
    assert raw.dtype == torch.bfloat16 and raw.tolist() == [3.140625, -1.0]


def test_float32_is_exact():
    y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    stored, back = round_trip("float32", y)
    assert stored.dtype == np.float32 and torch.equal(back, y)


def test_uint8_is_within_half_a_step_of_each_channels_scale():
    # channel 0: scale 0.5, offset 0; channel 1: scale 0.1, offset -1
    quant = ((0.5, 0.1), (0.0, -1.0))
    y = torch.tensor([[0.0, 0.74, 127.6], [-1.0, 0.04, 24.5]]).view(1, 2, 1, 3)
    stored, back = round_trip("uint8", y, quant)
    # q = round((x - offset) / scale): 1.48 -> 1, 255.2 -> 255; 10.4 -> 10, 255 -> 255
    assert stored.dtype == np.uint8 and stored.reshape(2, 3).tolist() == [[0, 1, 255], [0, 10, 255]]
    assert back.reshape(-1).tolist() == pytest.approx([0.0, 0.5, 127.5, -1.0, 0.0, 24.5], abs=1e-6)
    scale = torch.tensor(quant[0]).view(1, 2, 1, 1)
    assert torch.all((back - y).abs() <= scale / 2 + 1e-6)
    with pytest.raises(ValueError, match="scale, offset"):
        FORMATS["uint8"].encode(y, None)


def test_decoding_the_loaders_float_copy_works_in_place():
    """The loader converts a batch in one pass: it copies it into a float32 (channels-last) buffer and
    decodes that; no format may allocate a second copy."""
    quant = ((0.5,), (-1.0,))
    for name, fmt in FORMATS.items():
        stored = fmt.as_tensor(fmt.encode(column(0.0, 1.0, 3.0), quant if fmt.calibrated else None))
        copy = torch.empty(stored.shape, dtype=torch.float32).copy_(stored)
        out = fmt.decode(copy, quant if fmt.calibrated else None)
        assert out.data_ptr() == copy.data_ptr(), name
        assert out.reshape(-1).tolist() == [0.0, 1.0, 3.0], name


def test_fingerprint_tags_are_those_stores_were_written_under():
    """Existing stores are fingerprinted with these strings: changing one would make them all stale."""
    cases = [(CacheConfig(), "float16"), (CacheConfig(bitround=6), "float16/bitround6"),
             (CacheConfig(dtype="bfloat16"), "bfloat16"), (CacheConfig(dtype="float32"), "float32"),
             (CacheConfig(dtype="uint8"), "uint8/p100.0/8"),
             (CacheConfig(dtype="uint8", quant_percentile=99.99, quant_batches=0), "uint8/p99.99/0")]
    for c, tag in cases:
        assert storage_tag(c) == tag


def test_planner_bytes_per_sample_come_from_the_registry():
    # 3 x 5 x 7 = 105 elements
    assert sample_bytes((3, 5, 7)) == {"float16": 210, "bfloat16": 210, "float32": 420, "uint8": 105}


def test_the_plan_table_shows_every_format():
    costs = [StageCost(0, (3, 5, 7), 1.0, 3.0, sample_bytes((3, 5, 7))),
             StageCost(1, (2, 2, 2), 1.0, 3.0, sample_bytes((2, 2, 2)))]
    w = Workload(train=1000, test=0, epochs=1)
    chosen = plan(costs, w, 10**9, "bfloat16")
    described = describe(costs, w, chosen, "bfloat16", FLOPS)
    assert described["stages"][0]["store_bytes"]["bfloat16"] == 210_000
    console = Console(record=True, width=250)
    console.print(plan_table(described, "plan"))
    text = console.export_text()
    for name in FORMATS:
        assert f"{name} store" in text


def test_a_store_of_an_unknown_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "train.zarr"
    make_store(path, n=40)
    zarr.open_group(str(path), mode="r+").attrs["dtype"] = "float8"
    with pytest.raises(CacheError) as e:
        CacheReader(path)
    assert "'float8' is not a storage format" in str(e.value) and "\n" not in str(e.value)
