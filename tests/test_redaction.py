"""No secret is printed or written (issue 25): URL credentials (user:password@) and query strings
(?aws_secret_access_key=...) in any user-supplied location are redacted wherever the location is
formatted, and refused before a run can record them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachetrain.config import ConfigError, load_config
from cachetrain.errors import CacheError, DataError
from cachetrain.redact import redact
from tests.conftest import cli, cli_in_process, synthetic_raw, write_config

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLE"  # the shape of an AWS secret key: '/' and '+' in it


@pytest.mark.parametrize("text, kept", [
    (f"s3://AKIAKEY:{SECRET}@bucket/prefix", "s3://***@bucket/prefix"),
    (f"--set cache.location=s3://AKIAKEY:{SECRET}@bucket/prefix: no", "--set cache.location=s3://***@bucket/prefix: no"),
    (f"'s3://bucket/prefix?aws_secret_access_key={SECRET}&x=1'", "'s3://bucket/prefix?***'"),
    (f"s3:/AKIAKEY:{SECRET}@bucket/x", "s3:/***@bucket/x"),  # pathlib folds '//' into '/'
    (f"http://u:{SECRET}@127.0.0.1:9000/b", "http://***@127.0.0.1:9000/b"),
    (f"runs/x?aws_secret_access_key={SECRET} is not", "runs/x?*** is not"),
    (f"AKIAKEY:{SECRET}@bucket/x", "***@bucket/x"),
    (f"['s3://k:{SECRET}@b/p']", "['s3://***@b/p']"),
])
def test_redact_hides_credentials_and_query_strings(text, kept):
    assert redact(text) == kept


@pytest.mark.parametrize("text", ["runs/tiny/cache/stage_0/train.zarr: chunk 5 (samples 160-191): corrupt",
                                  "s3://bucket/prefix/run: bucket 'bucket' not found (cache.location)",
                                  "train.lr: expected a number > 0, got -1", "a@b.c wrote it", "what? nothing"])
def test_redact_leaves_text_without_secrets_alone(text):
    assert redact(text) == text


def test_user_errors_redact_their_own_message():
    for cls in (ConfigError, CacheError, DataError):
        assert SECRET not in str(cls(f"s3://k:{SECRET}@b/p: not found")) and "s3://***@b/p" in str(cls("s3://k:x@b/p"))


LOCATIONS = ["cache.location", "cache.remote_copies", "run_dir", "data.root", "name"]
PLANTS = [f"s3://AKIAKEY:{SECRET}@bucket/prefix", f"s3://bucket/prefix?aws_secret_access_key={SECRET}",
          f"s3:/AKIAKEY:{SECRET}@bucket/prefix", f"imgs?aws_secret_access_key={SECRET}"]


def plants(tmp_path: Path) -> list[str]:
    """PLANTS, the local one under tmp_path (a run that accepted it would write there)."""
    return PLANTS[:-1] + [f"{tmp_path}/{PLANTS[-1]}"]


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("key", LOCATIONS)
def test_a_secret_in_any_string_key_is_refused_without_echoing_it(tmp_path, key, plant):
    path = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run"))
    with pytest.raises(ConfigError) as e:
        load_config(path, [f"{key}={plant}"])
    assert SECRET not in str(e.value) and key in str(e.value) and "\n" not in str(e.value)


def _started_run(tmp_path: Path) -> Path:
    """A tiny run whose config.yaml and run.json exist (the `plan` command writes neither; `eval` of an
    untrained run starts it, then refuses in one line)."""
    config = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run"))
    cli_in_process(["eval", "--config", str(config)])
    assert (tmp_path / "run" / "config.yaml").is_file()
    return config


def _files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_planted_secret_appears_in_no_output_and_no_file(tmp_path, monkeypatch):
    config = _started_run(tmp_path)
    planted = plants(tmp_path)
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    outputs = []
    # in the config file, for each location key
    for key in LOCATIONS:
        for i, plant in enumerate(planted):
            raw = synthetic_raw(tmp_path / "run")
            section, _, name = key.rpartition(".")
            (raw.setdefault(section, {}) if section else raw)[name] = plant
            bad = write_config(tmp_path / f"bad-{key}-{i}.yaml", raw)
            for command in ("status", "verify", "plan"):
                outputs.append(cli_in_process([command, "--config", str(bad)]))
    # on the command line: --set, --run, --from-stage
    for key in LOCATIONS:
        for plant in planted:
            outputs.append(cli_in_process(["status", "--config", str(config), "--set", f"{key}={plant}"]))
            outputs.append(cli_in_process(["train", "--config", str(config), "--from-stage", "1",
                                           "--set", f"{key}={plant}"]))
    outputs.append(cli_in_process(["status", "--config", str(config), "--run", PLANTS[0]]))
    outputs.append(cli_in_process(["status", "--run", PLANTS[1]]))
    # from the environment: the data root of an image folder
    img = write_config(tmp_path / "img.yaml", synthetic_raw(tmp_path / "run2", data={"name": "imagefolder"}))
    for plant in planted:
        monkeypatch.setenv("CACHETRAIN_DATA", plant)
        outputs.append(cli_in_process(["status", "--config", str(img)]))
    for out in outputs:
        assert out.returncode in (0, 2), (out.args, out.stderr)
        assert SECRET not in out.stdout + out.stderr, (out.args, out.stdout + out.stderr)
        assert out.returncode == 0 or out.stderr.count("\n") == 1, out.stderr
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
    # only the config files the test planted it in hold it
    assert [p for p in _files_holding(tmp_path, SECRET) if not p.name.startswith("bad-")] == []
    assert not [p for p in tmp_path.rglob("*") if SECRET[:8] in str(p)]  # no file or folder named after it


def test_an_endpoint_url_with_credentials_is_not_echoed(tmp_path):
    pytest.importorskip("s3fs")
    config = write_config(tmp_path / "tiny.yaml", synthetic_raw(tmp_path / "run", cache={"location": "s3://bucket/x"}))
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://AKIAKEY:{SECRET}@127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run([sys.executable, "-m", "cachetrain.cli", "status", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_user_errors_are_one_line_whatever_they_quote():
    # found by tests/test_robustness.py (--set 'name=<newline>' echoed the newline into the error line)
    assert str(ConfigError("x.yaml with --set name=\n: name: expected a string")) == \
        "x.yaml with --set name=\\n: name: expected a string"
    assert "\n" not in str(DataError("data.root: train/a/new\nline.png: truncated"))
