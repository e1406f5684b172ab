"""Config parsing: types are the schema, errors are one line naming file, key and expectation."""

from __future__ import annotations

import pytest

from cachetrain.cli import main
from cachetrain.config import Config, ConfigError, load_config, save_config
from tests.conftest import cli, synthetic_raw, write_config


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config("fmnist")  # the built-in config, by name
    assert cfg.name == "fmnist" and cfg.data.name == "fmnist"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_set_overrides_parse_yaml_values(tiny_config_file):
    cfg = load_config(tiny_config_file, ["train.epochs=3", "model.downsample=[0, 2]", "train.nesterov=false"])
    assert cfg.train.epochs == 3 and cfg.model.downsample == [0, 2] and cfg.train.nesterov is False


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "epochz", 3, "train.epochz: unknown key"),
    ("train", "epochs", "three", "train.epochs: expected an integer, got 'three'"),
    ("train", "epochs", 0, "train.epochs: expected an integer >= 1, got 0"),
    ("train", "lr", True, "train.lr: expected a number, got True"),
    ("model", "arch", "vit", "model.arch: expected one of 'layercnn', 'vgg', 'resnet', got 'vit'"),
    ("cache", "dtype", "int4", "cache.dtype: expected one of"),
    ("cache", "chunk_mib", 0, "cache.chunk_mib: expected a number in [0.0625, 64], got 0"),
    ("cache", "batch_size", 0, "cache.batch_size: expected an integer >= 1, got 0"),
    ("model", "downsample", [7], "model.downsample: expected stage indices in [0, 2], got [7]"),
    ("cache", "location", "s3:/bucket/x", "cache.location: expected a folder or scheme://bucket/prefix"),
    ("cache", "location", "s3:///x", "cache.location: expected scheme://bucket/prefix"),
    ("cache", "remote_copies_gib", 0, "cache.remote_copies_gib: expected a size in GiB above 0"),
])
def test_bad_values_name_file_key_and_expectation(tmp_path, section, key, value, expected):
    path = write_config(tmp_path / "bad.yaml", synthetic_raw(tmp_path / "run", **{section: {key: value}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trian: unknown key; expected one of name, run_dir, data"):
        Config.from_dict({"trian": {"epochs": 1}})


def test_cli_config_error_is_one_line_and_nonzero(tmp_path, capsys):
    path = write_config(tmp_path / "bad.yaml", synthetic_raw(tmp_path / "run", train={"epochs": "x"}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.epochs: expected an integer, got 'x'" in err
    assert not (tmp_path / "run").exists()  # nothing was created for a config that never loaded


def test_cli_subprocess_exit_code_for_wrong_type_override(tiny_config_file):
    proc = cli(["status", "--config", str(tiny_config_file), "--set", "model.width=wide"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tiny_config_file} with --set model.width=wide: model.width: expected an integer, got 'wide'"]


def test_every_shipped_config_loads(repo_root):
    paths = sorted((repo_root / "cachetrain" / "configs").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        assert load_config(path).name == path.stem
        assert load_config(path.stem) == load_config(path)  # and by its name, from anywhere


# -- issue 25: --set values that are not YAML, numbers YAML 1.1 reads as strings, empty configs --------

@pytest.mark.parametrize("assignment, key, value", [
    ("train.epochs=[1", "train.epochs", "[1"),
    ("model.downsample={", "model.downsample", "{"),
    ("train.lr=: x", "train.lr", ": x"),
])
def test_set_value_that_is_not_yaml_is_one_line_naming_key_and_value(tiny_config_file, assignment, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config_file, [assignment])
    message = str(e.value)
    assert "\n" not in message and f"--set {key}=" in message and repr(value) in message and "YAML" in message


def test_scientific_notation_is_a_number_and_its_range_is_named(tiny_config_file):
    with pytest.raises(ConfigError, match=r"cache\.chunk_mib: expected a number in \[0\.0625, 64\], got 1e-09$"):
        load_config(tiny_config_file, ["cache.chunk_mib=1e-9"])
    assert load_config(tiny_config_file, ["train.lr=5e-2"]).train.lr == 0.05  # YAML 1.1 would read '5e-2' as text


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "- a\n- b\n", "just text\n", "3\n"])
def test_empty_or_non_mapping_config_file_is_one_line(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "mapping" in message


def test_unreadable_config_file_is_one_line(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    for path in (tmp_path / "dir.yaml", tmp_path / "latin1.yaml"):
        with pytest.raises(ConfigError, match=rf"^{path}: ") as e:
            load_config(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value", [("name", "a\x00b"), ("run_dir", "runs/a\nb"), ("data.root", "/d\x1b[31m")])
def test_control_characters_in_a_string_are_refused(tmp_path, key, value):
    raw = synthetic_raw(tmp_path / "run")
    section, _, name = key.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[name] = value
    path = write_config(tmp_path / "ctl.yaml", raw)
    with pytest.raises(ConfigError, match=f"{key}: expected a string without control characters") as e:
        load_config(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("assignment", ["train.lr=.inf", "train.lr=.nan", "cache.remote_copies_gib=.inf"])
def test_a_number_that_is_not_finite_is_refused(tiny_config_file, assignment):
    key = assignment.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: expected a finite number"):
        load_config(tiny_config_file, [assignment])
