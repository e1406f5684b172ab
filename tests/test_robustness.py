"""The standing robustness suite (issue 25): property-based tests that search rather than enumerate.

- `--set` strings and config files: for any input, the command line exits 0 or 2 with one line on stderr,
  never a traceback, and never writes into an existing run's config.yaml;
- store metadata: any single-field change of a store's zarr.json files (its attributes included) is refused
  when the store is opened, or read exactly as written; and `--repair` brings it back to a store that
  verifies and reads exactly as written;
- image folders: generated trees with file links, folder links (loops, into the tree, outside it), odd names
  and odd files: every sample is a file counted once, labelled by its class folder, anything else one line.

The examples are drawn by hypothesis under the `cachetrain` profile (tests/conftest.py: derandomized, so CI
sees the same examples every run; a small budget per test). HYPOTHESIS_PROFILE=search hunts with more.
The redaction property (a credential planted everywhere) is tests/test_redaction.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is part of [dev]")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

from cachetrain.cache import CacheError, CacheReader  # noqa: E402
from cachetrain.cache.loader import CacheLoader  # noqa: E402
from cachetrain.cache.verify import verify_store  # noqa: E402
from cachetrain.config import Config, DataConfig  # noqa: E402
from cachetrain.data.folder import FolderImages  # noqa: E402
from cachetrain.errors import DataError  # noqa: E402
from cachetrain.train.caching import drop_corrupt_chunks  # noqa: E402
from tests.conftest import STORE_N, cli_in_process, make_store, sample_ids, synthetic_raw, write_config  # noqa: E402


def one_line_or_ok(out) -> None:
    """The command line's contract for any input: exit 0, or exit 2 with one `error:` line; no traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode in (0, 2), (out.args, out.returncode, out.stderr)
    if out.returncode == 2:
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr


# -- config files and --set strings ---------------------------------------------------------------------

def _dotted_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _dotted_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = _dotted_keys() + ["stages.0.lr", "stages.1.epochs", "stages.x.lr", "stages.99.lr", "trian.epochs", "",
                         ".", "train.", "..x", "train.epochs.x", "data.shape.0", "name.x", "train", "cache"]
YAMLISH = ["1e-9", "-1", "0", "1", "2", "3", "1e308", "-1e308", ".nan", ".inf", "-.inf", "null", "~", "true", "no",
           "[1", "{", "[]", "{}", "[1, 2]", "[0, 1, 2]", "{a: 1}", "!!binary aGk=", "!!python/object:os.system x",
           "2020-01-01", "'x'", '"x"', ": x", "- a", "&a x", "*a", "%YAML", "|", "@", "`", "0x10", "0o7", "1_000",
           "12:30", "/tmp/x", "", "  ", "a\tb", "fmnist", "synthetic", "imagefolder", "uint8", "none", "plan",
           "s3://bucket/x", "s3:/bucket", "file:///tmp/x", "runs/../x", "é", "\u202e", "x" * 300]
VALUES = st.one_of(st.sampled_from(YAMLISH), st.integers(-3, 40).map(str),
                   st.text(alphabet="[]{}:,-#&*!|>'\"%@` \t\n0123456789.eE+-abcxyz", max_size=10),
                   st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                           max_size=12))
ASSIGNMENTS = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),
                        st.text(max_size=15).filter(lambda s: "\x00" not in s))


@pytest.fixture(scope="module")
def started_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run that has started (config.yaml and run.json written; `eval` of an untrained run starts it
    and refuses in one line): (its config file, its run directory)."""
    d = tmp_path_factory.mktemp("started")
    config = write_config(d / "tiny.yaml", synthetic_raw(d / "run", train={"probes": False}))
    cli_in_process(["eval", "--config", str(config)])
    assert (d / "run" / "config.yaml").is_file()
    return config, d / "run"


@pytest.fixture
def quiet_aws(monkeypatch, tmp_path):
    """No instance-metadata lookups for credentials (an s3:// location with none fails at once), and a
    scratch working directory: a relative run_dir lands there, not in the checkout."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.chdir(tmp_path)


def _run_files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "run.json") if (run / name).exists()}


@given(assignments=st.lists(ASSIGNMENTS, min_size=1, max_size=3), command=st.sampled_from(["status", "verify"]),
       by_run=st.booleans())
def test_any_set_strings_are_exit_0_or_one_line(started_run, quiet_aws, assignments, command, by_run):
    config, run = started_run
    assume(not any(a.startswith("model.stages=") and a[13:].strip().isdigit() and int(a[13:]) > 64
                   for a in assignments))  # status then lists every stage: slow, not wrong
    before = _run_files(run)
    target = ["--run", str(run)] if by_run else ["--config", str(config)]
    out = cli_in_process([command, *target, *(x for a in assignments for x in ("--set", a))])
    one_line_or_ok(out)
    assert _run_files(run) == before


def _mutated_config(draw, run: Path) -> str:
    """A config file's text: random text, or the tiny run's config with one key changed, removed or added."""
    if draw(st.booleans()):
        return draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
    raw = synthetic_raw(run, train={"probes": False})
    section = draw(st.sampled_from([None, *raw]))
    node = raw if section is None or not isinstance(raw[section], dict) else raw[section]
    key = draw(st.one_of(st.sampled_from(sorted(node)), st.text(max_size=6)))
    change = draw(st.sampled_from(["value", "delete", "scalar-section"]))
    if change == "delete":
        node.pop(key, None)
    elif change == "scalar-section" and section is not None:
        raw[section] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers())))
    else:
        node[key] = draw(st.one_of(st.none(), st.booleans(), st.integers(-2, 40), st.floats(),
                                   st.text(max_size=8), st.lists(st.integers(-1, 3), max_size=4),
                                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                                   st.sampled_from(YAMLISH)))
    return yaml.safe_dump(raw)


@given(data=st.data())
def test_any_config_file_is_exit_0_or_one_line(started_run, quiet_aws, tmp_path, data):
    _, run = started_run
    before = _run_files(run)
    text = _mutated_config(data.draw, run)  # run_dir: the started run's, unless the change removed it
    config = Path(tempfile.mkdtemp(dir=tmp_path)) / "c.yaml"
    config.write_text(text)
    one_line_or_ok(cli_in_process(["status", "--config", str(config)]))
    assert _run_files(run) == before


# -- store metadata --------------------------------------------------------------------------------------

STORE_FILES = ["zarr.json", "features/zarr.json", "labels/zarr.json", "chunk_crc32c/zarr.json"]
DELETE = object()


@pytest.fixture(scope="module")
def pristine_stores(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stores")
    stores = {}
    for codec in ("zstd", "none"):
        make_store(d / codec / "train.zarr", codec=codec)
        stores[codec] = d / codec / "train.zarr"
    return stores


def _leaves(node, path=()) -> list[tuple]:
    """Every field of a JSON document, as a path of keys and indices (containers included: a field whose
    value is a list or a mapping can be changed as a whole)."""
    out = [path] if path else []
    if isinstance(node, dict):
        for k in sorted(node):
            out += _leaves(node[k], path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _leaves(v, path + (i,))
    return out


def _neighbours(value) -> list:
    """Values near `value` that a plausible edit would write (the likeliest to slip through a check)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 2 * value, 0, 10**12]
    if isinstance(value, float):
        return [value + 1, -value, float("nan")]
    if isinstance(value, str):
        return [value + "x", "", "float32", "int32", "uint8", "big", "zstd", "crc32c", "bytes", "."]
    return [None, [], {}]


@settings(max_examples=20)
@given(data=st.data(), codec=st.sampled_from(["zstd", "none"]), file=st.sampled_from(STORE_FILES))
def test_any_single_field_change_of_store_metadata_is_refused_or_harmless_and_repaired(
        pristine_stores, tmp_path, data, codec, file):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "train.zarr"
    shutil.copytree(pristine_stores[codec], path)
    meta = json.loads((path / file).read_text())
    field = data.draw(st.sampled_from(_leaves(meta)))
    node = meta
    for k in field[:-1]:
        node = node[k]
    old = node[field[-1]]
    new = data.draw(st.one_of(st.sampled_from(_neighbours(old)), st.just(DELETE), st.none(),
                              st.integers(-1, 2**40), st.text(max_size=6), st.lists(st.integers(0, 64), max_size=4)))
    if new is DELETE and isinstance(node, dict):
        del node[field[-1]]
    else:
        assume(new is not DELETE)
        node[field[-1]] = new
    (path / file).write_text(json.dumps(meta))

    try:
        reader = CacheReader(path, "fp")
    except CacheError as e:  # refused on open, in one line
        assert "\n" not in str(e)
    else:  # or harmless: every sample exactly as written, no error on the way
        assert np.array_equal(_all_samples(reader), np.arange(STORE_N)), (file, field, new)
    assert isinstance(verify_store(path), list)  # verify names what it finds, whatever it finds
    # `cachetrain cache --j J --repair`: drop what verify finds, then a caching pass over the store
    drop_corrupt_chunks([("train", 0, path)])
    make_store(path, codec=codec)
    assert verify_store(path) == [], (file, field, new)
    assert np.array_equal(_all_samples(CacheReader(path, "fp")), np.arange(STORE_N))


def _all_samples(reader: CacheReader) -> np.ndarray:
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    return sample_ids(loader.batches(np.arange(reader.info.num_samples), 64))


# -- image folders ---------------------------------------------------------------------------------------

CLASSES = ("a", "b")
NAME = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
               max_size=8).filter(lambda s: s not in (".", ".."))


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path, format="PNG")


@st.composite
def image_trees(draw):
    """(what to make, the real images a class must hold): plain images in train/<class>/ and val/<class>/,
    then extra entries in train/'s class folders: file links (to a sample, to a file outside, to nothing),
    folder links (loops, into the tree, outside it), subfolders of images, odd names, non-images, FIFOs."""
    extras = draw(st.lists(st.tuples(
        st.sampled_from(CLASSES),
        st.sampled_from(["link-sample", "link-outside", "link-broken", "dirlink", "subdir", "odd-image",
                         "not-image", "hidden", "fifo"]),
        NAME,
        st.sampled_from(["..", ".", "../..", "../../..", "../b", "../a", "OUTSIDE", "sub"])), max_size=4))
    return draw(st.integers(1, 2)), extras


def _make_tree(root: Path, outside: Path, plain: int, extras) -> set[str]:
    """Make the tree; the real paths of the images every class folder must hold, whatever else is there."""
    must = set()
    for c, name in enumerate(CLASSES):
        for i in range(plain):
            _png(root / "train" / name / f"{i}.png", 40 + 80 * c + i)
            must.add(os.path.realpath(root / "train" / name / f"{i}.png"))
        _png(root / "val" / name / "0.png", 40 + 80 * c)
    _png(outside / "out.png", 7)
    for k, (cls, kind, name, target) in enumerate(extras):
        folder = root / "train" / cls
        entry = folder / f"{k}{name}"
        if os.path.lexists(entry):
            continue
        if kind == "link-sample":
            os.symlink(f"../{target[-1] if target[-1] in CLASSES else cls}/0.png", entry)
        elif kind == "link-outside":
            os.symlink(outside / "out.png", entry.with_name(entry.name + ".png"))
        elif kind == "link-broken":
            os.symlink("nowhere.png", entry.with_name(entry.name + ".png"))
        elif kind == "dirlink":
            os.symlink(outside if target == "OUTSIDE" else target, entry)
        elif kind == "subdir":
            _png(entry / "s.png", 99)
            must.add(os.path.realpath(entry / "s.png"))
        elif kind == "odd-image":
            _png(entry.with_name(entry.name + ".png"), 33)
            must.add(os.path.realpath(entry.with_name(entry.name + ".png")))
        elif kind == "not-image":
            entry.write_bytes(b"not an image")
        elif kind == "hidden":
            (folder / f".{k}{name}").write_bytes(b"ignored")
        elif kind == "fifo":
            os.mkfifo(entry.with_name(entry.name + ".jpg"))
    return must


@given(tree=image_trees(), skip=st.booleans())
def test_any_image_tree_counts_each_file_once_labelled_by_its_class_folder(tmp_path, tree, skip):
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    plain, extras = tree
    try:
        must = _make_tree(base / "root", base / "outside", plain, extras)
    except OSError:  # a name this file system refuses (too long in bytes): not the code under test
        assume(False)
    try:
        data = FolderImages(DataConfig(name="imagefolder", root=str(base / "root"), image_size=8, val_samples=0,
                                       skip_bad_images=skip), seed=0, device=torch.device("cpu"), workers=0,
                            backend="numpy")
    except DataError as e:
        assert "\n" not in str(e) and len(str(e)) < 400, str(e)
        return
    files, labels = data.files("train"), data.labels("train")
    real = [os.path.realpath(f) for f in files]
    assert len(set(real)) == len(real)  # no file is a sample twice
    assert must <= set(real)  # every plain image is a sample
    for f, y in zip(files, labels):
        assert Path(f).is_file()
        assert Path(f).relative_to(base / "root" / "train").parts[0] == CLASSES[y]  # its class folder
